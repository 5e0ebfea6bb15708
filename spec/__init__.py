"""Model-free drafters over token ids, and their offline simulator (``python -m spec.simulate``).

Pure Python and numpy: nothing here loads a model, and nothing imports the engine.
"""

from spec.draft import Draft, Drafter
from spec.ngram_table import NGramTable
from spec.stand import StandConfig, StandDrafter, gumbel_top_k
from spec.suffix import SuffixConfig, SuffixDrafter
from spec.suffix_automaton import SuffixAutomaton

__all__ = [
    "Draft",
    "Drafter",
    "NGramTable",
    "StandConfig",
    "StandDrafter",
    "SuffixAutomaton",
    "SuffixConfig",
    "SuffixDrafter",
    "gumbel_top_k",
]
