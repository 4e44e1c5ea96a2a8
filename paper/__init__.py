"""The paper's figures (figures.py), its analyses behind them (analyses.py), its transfer tables (transfer.py) and
the drawing code (plot.py). eval.py calls them; each also runs on its own (see its docstring)."""
