"""Triton kernels of kobattr, installed as ``kobattr.kernels``. attention_pairs.py and ff_pairs.py each
hold their pair kernel and its launcher; rows.py what both share: the query rows of a program, the keys
they see (the visibility rule), the row log-sum-exp kernel and the alpha tiles."""
