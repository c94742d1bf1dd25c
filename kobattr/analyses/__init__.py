"""Corpus-level analyses built on kobattr.analyze(): head statistics (Clark et al. 2019, Kobayashi et al. 2020)."""

from .heads import (CATEGORIES, DepSentence, HeadStatistics, head_statistics, read_conllu, sample_conllu_path,
                    write_report)

__all__ = ["CATEGORIES", "DepSentence", "HeadStatistics", "head_statistics", "read_conllu", "sample_conllu_path",
           "write_report"]
