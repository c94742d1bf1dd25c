"""Triton kernels of kobattr, installed as ``kobattr.kernels``. attention_pairs.py and ff_pairs.py each
hold their pair kernel and its launcher; attention_pairs_streamed.py and attention_pairs_staged.py two
alternative attention pair kernels (the triton_streamed and triton_staged implementations, which the tuner
times); rows.py what all share: the query rows of a program, the keys they see (the visibility rule), the row
log-sum-exp kernel and the alpha tiles."""

if __name__ == "kernels":  # imported from the source tree's root, in place of Hugging Face's `kernels` package
    raise ImportError("this is kobattr's kernels/ folder (installed as kobattr.kernels), found because the kobattr "
                      "repository's root is on sys.path, where it hides Hugging Face's `kernels` package that "
                      "transformers imports: run from another directory, or `python -P` (Python >= 3.11).")
