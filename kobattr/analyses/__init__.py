"""Corpus-level analyses built on kobattr.analyze(): head statistics (Clark et al. 2019, Kobayashi et al. 2020) and
corpus runs (per-token mixing ratios and pooled statistics, sharded over torch.distributed ranks, resumable)."""

from .corpus import CorpusError, open_corpus, run_corpus
from .heads import (CATEGORIES, DepSentence, HeadStatistics, head_statistics, read_conllu, sample_conllu_path,
                    write_report)

__all__ = ["CATEGORIES", "CorpusError", "DepSentence", "HeadStatistics", "head_statistics", "open_corpus",
           "read_conllu", "run_corpus", "sample_conllu_path", "write_report"]
