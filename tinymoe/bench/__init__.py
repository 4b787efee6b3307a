"""`python -m tinymoe.bench`: side-by-side speed ratios (see __main__.py)."""
