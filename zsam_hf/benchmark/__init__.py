"""The optimizer-comparison grid (``grid.py``) and its tables and plots (``report.py``).

Needs the ``benchmark`` extra (``pip install "zsam-hf[benchmark]"``); the core never imports it.
"""
