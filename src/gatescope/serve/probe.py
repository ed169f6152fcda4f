"""The probe: any text through the model, read at one layer.

The text is tokenized as a corpus text is (the model's BOS first), cut to the model's
context (at most :data:`MAX_PROBE_TOKENS`) with a note when longer, and run up to the layer
(:func:`gatescope.recompute.probe`).
The answer holds one neuron's four quantities on every token (the page colors them, each
token with its sign case), and, at one chosen token, the neurons of the layer most
activated there per sign case (by |hook_post|).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from gatescope.constants import CASES, QUANTITIES
from gatescope.errors import GatescopeError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from gatescope.loading import LoadedModel

__all__ = ["MAX_PROBE_CHARS", "MAX_PROBE_TOKENS", "ProbeResult", "TopNeuron", "run_probe"]

#: The longest probe text accepted, in characters (longer requests are refused).
MAX_PROBE_CHARS = 100_000
#: The most tokens probed (a longer text is cut, with a note): the model's context, or this
#: if less; the forward's memory grows with the square of the length.
MAX_PROBE_TOKENS = 4096
#: Neurons listed per case at the chosen token.
TOP_NEURONS = 10


@dataclass(frozen=True)
class TopNeuron:
    neuron: int
    hook_post: float


@dataclass(frozen=True)
class ProbeResult:
    """A probe of one text at one layer."""

    layer: int
    neuron: int
    input_ids: tuple[int, ...]
    tokens: tuple[str, ...]  # each token as it reads
    values: np.ndarray  # [quantity, pos] the neuron's g, u, act(g), act(g) * u
    position: int  # the chosen token
    top: dict[str, tuple[TopNeuron, ...]]  # per case, at the chosen token, strongest first
    given_tokens: int  # the text's tokens before any cut
    limit: int  # the most tokens probed: the model's context, or MAX_PROBE_TOKENS if less

    @property
    def truncated(self) -> bool:
        return self.given_tokens > len(self.input_ids)

    @property
    def cases(self) -> list[str | None]:
        """Each token's sign case for the neuron (None: g or u is 0)."""
        from gatescope.stats.quantities import sign_cases

        found = sign_cases(self.values[0], self.values[1])
        return [CASES[c] if c >= 0 else None for c in found.tolist()]


def run_probe(
    loaded: LoadedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    layer: int,
    neuron: int,
    position: int | None = None,
    *,
    refactor_glu: bool = False,
) -> ProbeResult:
    """Probes ``text`` at ``layer`` for ``neuron``; ``position`` picks the token whose top
    neurons are listed (default: the neuron's strongest |hook_post|)."""
    from gatescope.pages import token_strings
    from gatescope.recompute import probe

    if len(text) > MAX_PROBE_CHARS:
        raise GatescopeError(f"a probe text holds at most {MAX_PROBE_CHARS:,} characters.")
    if not text.strip():
        raise GatescopeError("type a text to probe.")
    context = getattr(loaded.model.config, "max_position_embeddings", None)
    limit = min(context or MAX_PROBE_TOKENS, MAX_PROBE_TOKENS)
    ids, given = _tokens(tokenizer, text, limit)
    found = probe(loaded, ids, layer, neuron, position, refactor_glu=refactor_glu)
    return ProbeResult(
        layer=layer,
        neuron=neuron,
        input_ids=tuple(ids),
        tokens=tuple(token_strings(tokenizer, ids)),
        values=found.neuron,
        position=found.position,
        top=_top_neurons(found.at_position),
        given_tokens=given,
        limit=limit,
    )


def _tokens(tokenizer: PreTrainedTokenizerBase, text: str, limit: int) -> tuple[list[int], int]:
    """The text's token ids as a corpus has them (the start token first), cut to ``limit``,
    and how many there were before the cut."""
    from gatescope.corpus import start_token

    ids = [start_token(tokenizer), *tokenizer(text, add_special_tokens=False)["input_ids"]]
    return ids[:limit], len(ids)


def _top_neurons(at: np.ndarray) -> dict[str, tuple[TopNeuron, ...]]:
    """Per case, the neurons in that case at a token, by |hook_post| (``at``:
    [quantity, neuron])."""
    from gatescope.stats.quantities import sign_cases

    cases = sign_cases(at[0], at[1])
    post = at[QUANTITIES.index("hook_post")]
    strength = np.abs(post)
    top = {}
    for c, case in enumerate(CASES):
        members = np.flatnonzero(cases == c)
        best = members[np.argsort(-strength[members], kind="stable")[:TOP_NEURONS]]
        top[case] = tuple(TopNeuron(int(n), float(post[n])) for n in best)
    return top
