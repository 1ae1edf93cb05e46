"""Tools built on the trainers: the embedded demo (demo.py), the self-check (selfcheck.py) and
ExPO (expo.py)."""
