"""The paper's transfer tables: one backbone on each set's official train/test split, Table 1 (a linear probe on 6
sets) and Table 4 (appendix C: kNN, k = 10, on 4), by the protocol of Chen et al. 2020 (SimCLR, appendix B.8), which
the paper cites; and the transfer-only data sets (Flowers-102, Oxford-IIIT Pet, Stanford Cars, Food-101), which
simlap.build_dataset builds from here.

    python eval.py --backbone runs/x/backbone.pt --image-size 224 --data ~/data --transfer table1,table4
    python paper/transfer.py table1,table4 --backbone runs/x/backbone.pt --image-size 224 --data ~/data   # the same

Every image is resized to --image-size on its shorter side (bicubic) and center-cropped, with ImageNet normalisation;
features are extracted once per set; weighted kNN at k = 10 (Table 4) and --k; an L-BFGS logistic-regression probe
whose l2 strength is chosen on a validation split carved from the training split (a seeded, stratified 20 %) among
1e-6, 1e-5, ..., 1 (Chen et al.: 45 values from 1e-6 to 1e5), then refitted on the whole training split and scored on
test (eval.tuned_probe). Results go to transfer.json and transfer.md, one row per set and the layouts of Tables 1 and
4 with the paper's rows beside; a set missing under --data is reported as missing, with how to get it, and the others
still run. What each set is read from under --data (as torchvision's downloads unpack; Stanford Cars can no longer
be downloaded):
    cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}    cifar-100-python/{train,test,meta}
    stl10_binary/{train_X,train_y,test_X,test_y,unlabeled_X}.bin      flowers-102/{jpg/,imagelabels.mat,setid.mat}
    oxford-iiit-pet/{images/,annotations/trainval.txt,test.txt}      food-101/{images/<class>/,meta/{train,test}.json}
    stanford_cars/{devkit/{cars_meta,cars_train_annos}.mat,cars_train/,cars_test/,cars_test_annos_withlabels.mat}
    imagefolder: train/<class>/* and val/<class>/*, val's classes matched to train's by folder name
"""
import os
import sys

if __package__ in (None, ""):  # run as a script: the repository root holds simlap.py and eval.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torchvision  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

import eval as evaluation  # noqa: E402  (eval.py; renamed: eval is a builtin)
import simlap  # noqa: E402
from eval import PAPER_K, PROBE_GRID, knn_key  # noqa: E402
from simlap import UserError  # noqa: E402


# ----------------------------------------------------------------------------------------------- data sets
def transfer_set(name, root, train, transform=None, download=False):
    """One split (train: True for the training split) of a transfer-only set of simlap.TRANSFER_ONLY, read as
    torchvision's downloads unpack (images by simlap.read_image). simlap.build_dataset calls this and turns
    torchvision's errors for missing files into FileNotFoundError."""
    tv, split, read = torchvision.datasets, "train" if train else "test", simlap.read_image
    if name == "flowers102":
        return (flowers_train_val(root, transform, download) if train else
                tv.Flowers102(root, "test", transform, download=download, loader=read))
    if name == "pets":
        return OxfordPets(root, "trainval" if train else "test", transform=transform, download=download)
    if name == "cars":
        return tv.StanfordCars(root, split, transform=transform, download=download, loader=read)
    if name == "food101":
        return tv.Food101(root, split, transform=transform, download=download, loader=read)
    raise ValueError(f"{name!r} is not a transfer-only set ({', '.join(simlap.TRANSFER_ONLY)})")


def flowers_train_val(root, transform=None, download=False):
    """Flowers-102's train and val splits as one training set of 2040 images, as the paper counts it (appendix D)
    and as Chen et al. 2020 fit their final probe; test is the 6149 images of its test split."""
    ds = torchvision.datasets.Flowers102(root, "train", transform, download=download, loader=simlap.read_image)
    val = torchvision.datasets.Flowers102(root, "val", loader=simlap.read_image)
    ds._labels, ds._image_files = ds._labels + val._labels, ds._image_files + val._image_files
    return ds


class OxfordPets(torchvision.datasets.OxfordIIITPet):
    """torchvision's Oxford-IIIT Pet (the 37 breeds), its images read by read_image: torchvision's class opens them
    itself and takes no loader."""

    def __getitem__(self, i):
        image = simlap.read_image(self._images[i])
        return (self.transform(image) if self.transform else image), self._labels[i]


# ----------------------------------------------------------------------------------------------- transfer
# The paper's transfer tables (ResNet-50 pre-trained on ImageNet-1K), their data sets in their column order, and their
# rows, quoted: Table 1, linear probe top-1 % and the average; Table 4 (appendix C), kNN (k = 10) top-1 %.
TABLE1 = ("cars", "cifar10", "cifar100", "flowers102", "pets", "stl10")
TABLE4 = ("cifar10", "cifar100", "cars", "food101")
COLUMN = {"cars": "Cars", "cifar10": "CF10", "cifar100": "CF100", "flowers102": "FLW", "pets": "Pets", "stl10": "STL",
          "food101": "Food"}  # the paper's column names
PAPER_TABLE1 = {"SimCLR, 1000 ep": (92.7, 98.2, 85.5, 92.2, 90.8, 97.5, 92.8),
                "SupCon, 600 ep": (93.0, 97.4, 85.0, 91.1, 92.1, 97.7, 92.7),
                "SimLAP, 500 ep": (92.9, 98.0, 85.0, 91.9, 91.7, 97.0, 92.7),
                "MoCo v3, 1000 ep": (93.2, 98.4, 86.1, 95.6, 93.0, 97.8, 94.0),
                "GPaCo, 700 ep": (92.8, 98.3, 86.2, 94.1, 92.2, 97.9, 93.6),
                "SimLAP-MoCo, 300 ep": (93.6, 98.3, 86.0, 95.7, 92.8, 97.9, 94.0)}
PAPER_TABLE4 = {"SimCLR": (85.5, 61.5, 14.8, 51.2), "SupCon": (84.8, 60.2, 30.9, 53.5),
                "SimLAP": (86.3, 64.6, 36.7, 54.3), "SupCon, pseudo labels": (79.5, 55.3, 17.0, 43.5),
                "SimLAP, pseudo labels": (82.2, 57.7, 18.2, 46.6)}
PAPER_SETS = {"table1": TABLE1, "table4": TABLE4}


def transfer_sets(text):
    """--transfer's comma-separated list -> data set names, in order, each once; table1 and table4 stand for the sets
    of the paper's Table 1 and Table 4."""
    names = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        for name in PAPER_SETS.get(part, (part,)):
            if name not in simlap.DATASETS:
                raise UserError(f"--transfer: unknown set {name!r}; choose from table1, table4, "
                                f"{', '.join(simlap.DATASETS)}")
            names += [name] if name not in names else []
    if not names:
        raise UserError("--transfer needs at least one set, e.g. --transfer table1")
    return names


def check_args(args):
    """eval.py --transfer SETS: the sets, in order (transfer_sets), and no flag that applies to one data set only."""
    args.transfer = transfer_sets(args.transfer)
    for flag, value in (("--dataset", args.dataset), ("--kmeans", args.kmeans), ("--labels", args.labels),
                        ("--cache-features", args.cache_features)):
        if value is not None:
            raise UserError(f"{flag} does not apply to --transfer, which evaluates each of its sets; leave it out")


def transfer_transform(size):
    """Chen et al. 2020's transfer preprocessing (appendix B.8), for every set: the shorter side resized to `size`
    (bicubic), a size x size center crop, ImageNet normalisation, no augmentation."""
    return v2.Compose([v2.ToImage(), v2.Resize(size, v2.InterpolationMode.BICUBIC, antialias=True), v2.CenterCrop(size),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(simlap.MEAN, simlap.STD)])


def transfer(args, backbone, info):
    """--transfer SETS: on each set's official train/test split, features extracted once, weighted kNN (k = 10 and
    --k) and the tuned linear probe (tuned_probe) -> OUTPUT_DIR/transfer.json and transfer.md (one row per set, and
    the layouts of the paper's Tables 1 and 4 with the paper's rows beside), also printed. A set whose files are
    missing is reported as missing, with how to get it; the others still run."""
    size, data, sets, missing = load_transfer_sets(args, backbone, info)
    backbone.to(args.device)
    rows = {}
    with evaluation.unchanged(backbone):
        for name in args.transfer:
            if name in missing:
                rows[name] = {"status": "missing", "how": missing[name]}
                continue
            rows[name] = evaluate_set(args, backbone, sets.pop(name))  # its features are freed after it
    weights = args.checkpoint or args.backbone
    res = {"weights": os.path.abspath(weights), "arch": info["arch"], "trained_on": info.get("dataset"),
           "data": data, "image_size": size, "knn_temperature": args.temperature, "probe_grid": list(PROBE_GRID),
           "sets": rows}
    res["tables"] = paper_layouts(res)
    text = transfer_markdown(res, args.k)
    out_dir = args.output_dir or os.path.dirname(os.path.abspath(weights))
    os.makedirs(out_dir, exist_ok=True)
    simlap.save_atomic(res, os.path.join(out_dir, "transfer.json"), save=simlap.save_json)
    simlap.save_atomic(text, os.path.join(out_dir, "transfer.md"), save=lambda text, f: f.write(text.encode()))
    print(text, end="")
    print(f"wrote {os.path.join(out_dir, 'transfer.json')} and transfer.md")
    return res


def load_transfer_sets(args, backbone, info):
    """-> (image size, --data, {set: its {"train", "test"} splits}, {set: why it is missing and how to get it}),
    refusing, before anything is written, what cannot be evaluated."""
    size = evaluation.image_size(args, backbone, info)
    data = args.data or info.get("data")
    if not data and set(args.transfer) != {"synthetic"}:
        raise UserError("--transfer needs --data ROOT, the folder that holds its data sets (README: the layout)")
    per_class = args.synthetic_per_class or info.get("synthetic_per_class")
    sets, missing = {}, {}
    for name in args.transfer:
        try:
            sets[name] = {s: simlap.build_dataset(name, data, s, transfer_transform(size), args.download, per_class)
                          for s in ("train", "test")}
        except FileNotFoundError as e:  # reported in the table, the other sets still run
            missing[name] = str(e)
            continue
        except ValueError as e:  # e.g. an ImageFolder whose val split has a class train/ lacks
            raise UserError(str(e)) from None
        labels = simlap.targets_of(sets[name]["train"])
        evaluation.check_bank(args, len(labels), f"{name}: ")
        if not (torch.bincount(labels) >= 2).any():
            raise UserError(f"{name}: no class has 2 training images, so no validation split for the probe's l2")
    if not sets:
        raise UserError(f"none of {', '.join(args.transfer)} was found under --data {data!r}: "
                        f"{next(iter(missing.values()))}")
    return size, data, sets, missing


def evaluate_set(args, backbone, splits):
    """One set of --transfer: features of both splits, extracted once, -> its row: sizes, kNN and tuned probe."""
    num_classes = simlap.num_classes_of(splits["train"])
    feats = evaluation.all_features(backbone, splits, args, args.device, None)  # (--transfer refuses --cache-features)
    (train_f, train_y), (test_f, test_y) = feats["train"], feats["test"]
    probe = evaluation.tuned_probe(train_f, train_y, test_f, test_y, num_classes, args.probe_iters, args.device)
    return {"status": "ok", "num_train": len(train_y), "num_test": len(test_y), "num_classes": num_classes,
            "knn": evaluation.knn_accuracy(args, feats), "linear_probe": probe}


def paper_layouts(res):
    """This backbone's cells in the layouts of the paper's Table 1 (probe, with the average over its six sets) and
    Table 4 (kNN, k = 10): {"table1": {column: % or "missing" or None (not asked)}, "table4": ...}; a table none of
    whose sets was asked is left out. The average needs all six sets (else None)."""
    rows, knn10 = res["sets"], knn_key(PAPER_K, res["knn_temperature"])
    cell = lambda name, pick: (None if name not in rows else "missing" if rows[name]["status"] != "ok"  # noqa: E731
                               else pick(rows[name]))
    out = {}
    for table, names, pick in (("table1", TABLE1, lambda r: r["linear_probe"]["test_top1"]),
                               ("table4", TABLE4, lambda r: r["knn"][knn10])):
        if set(names) & set(rows):
            out[table] = {COLUMN[name]: cell(name, pick) for name in names}
    if "table1" in out:
        values = list(out["table1"].values())
        out["table1"]["AVG"] = sum(values) / 6 if all(isinstance(v, float) for v in values) else None
    return out


def transfer_markdown(res, k):
    """transfer.md: one row per set, then the paper's Table 1 and Table 4 layouts with this backbone's row above the
    paper's rows, then one line per missing set saying how to get it."""
    show = lambda v: "—" if v is None else v if isinstance(v, str) else f"{v:.1f}"  # noqa: E731
    T = res["knn_temperature"]
    lines = [f"| set | train | test | classes | kNN k={PAPER_K} | kNN k={k} | linear probe | probe l2 |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in res["sets"].items():
        probe = r.get("linear_probe", {})
        cells = ["missing", "", "", "", "", "", ""] if r["status"] != "ok" else [
            r["num_train"], r["num_test"], r["num_classes"], show(r["knn"][knn_key(PAPER_K, T)]),
            show(r["knn"][knn_key(k, T)]), show(probe["test_top1"]), f"{probe['weight_decay']:g}"]
        lines.append("| " + " | ".join([name, *map(str, cells)]) + " |")
    for table, title, paper in (("table1", "Table 1: linear probe top-1 %", PAPER_TABLE1),
                                ("table4", f"Table 4: kNN (k = {PAPER_K}) top-1 %", PAPER_TABLE4)):
        if table in res["tables"]:
            ours = res["tables"][table]
            lines += ["", f"| {title} | " + " | ".join(ours) + " |", "|---" * (len(ours) + 1) + "|",
                      "| this backbone | " + " | ".join(map(show, ours.values())) + " |"]
            lines += [f"| paper: {who} | " + " | ".join(f"{v:.1f}" for v in row) + " |" for who, row in paper.items()]
    missing = [r["how"] for r in res["sets"].values() if r["status"] != "ok"]  # each names its set
    return "\n".join(lines + ([""] + missing if missing else [])) + "\n"


if __name__ == "__main__":  # python paper/transfer.py SETS --backbone ... is eval.py --transfer SETS --backbone ...
    argv = sys.argv[1:]
    evaluation.cli(argv if {"-h", "--help"} & set(argv) else ["--transfer", *argv])
