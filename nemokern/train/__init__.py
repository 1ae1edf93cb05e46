"""Training-side code: the embedded demo (demo.py), checks of run options (options.py) and the
loss and advantage formulas (losses.py)."""
