"""Team SYSU-SAIL's k-mer BERT tokens: 3-mers over ACGTN plus five specials, 130 ids.

Vocabulary (fixed, independent of corpus frequencies)::

    [PAD]=0 [CLS]=1 [UNK]=2 [SEP]=3 [MASK]=4, then the 125 3-mers over ACGTN in
    lexicographic order of the alphabet order "ACGTN" (AAA=5, AAC=6, ..., NNN=129)

so a 3-mer's id is ``5 + 25*c0 + 5*c1 + c2`` with the base codes of
:mod:`promoter_dist.data.alphabet` (A0 C1 G2 T3 N4).

The team report fixes the vocabulary and says each sequence is "extended 150bp
(upstream) and 150bp (downstream)"; it leaves the rest open. The choices made here:

Flank joining
    The vector's 150 bp either side of the random region (``UPSTREAM_150`` /
    ``DOWNSTREAM_150``) already end / start with the 17-bp 5' and 13-bp 3' adapters
    that every row carries. Gluing the full 150 bp onto a row would repeat the
    adapters, which is not DNA that exists in the plasmid. The input is therefore
    ``UPSTREAM_150[:-17] + row + DOWNSTREAM_150[13:]`` (133 + row + 137 bp): the row's
    own adapter bases are kept, so a nominal 110-bp row becomes exactly the 380-bp
    plasmid context (150 + 80 + 150). Rows of other lengths (synthesis errors, about
    18% of the training rows) keep all their own bases; nothing is trimmed or
    realigned, so their extended length is ``270 + len(row)``.

Shorter flanks (``flank_bp``, ``data.kmer_flank_bp``)
    The vector bases are the same in every row, yet at 150 bp a side they are 100 of a
    110-bp row's 128 tokens, and the compute of a step follows the tokens. ``flank_bp``
    counts the extension on each side as above, the row's own adapters included: 150
    (the default) is the published context; ``flank_bp = b`` in 19..150 adds only the
    ``b - 17`` vector bases next to the 5' adapter and the ``b - 13`` next to the 3'
    adapter. 19 keeps the two vector bases before the row that the frame offsets take.

Reading frames
    Tokens are non-overlapping 3-mers. Frame ``f`` in {0, 1, 2} starts at offset ``f``
    of the extended sequence (its first ``f`` bases, all vector, are skipped); a
    trailing 1-2 bases that do not fill a 3-mer are dropped. A 380-bp context gives
    126 3-mers in every frame, 128 tokens with [CLS] and [SEP]. SYSU's published model
    code averages three token sequences per input; the three reading frames are the
    natural reading of that (an inference: the tokenizer code is not public). Frame 0
    is the default; :func:`build_tokenizer` / :func:`encode_codes` take any frame and
    :func:`build_frame_tokenizers` / :func:`encode_codes_all_frames` give all three.

Letters
    Lower case folds to upper case. Any other character (including whitespace; the
    row is taken exactly as given, nothing is stripped) makes the 3-mer it falls in
    [UNK]. One character is one position, as in :func:`alphabet.encode`, so the string
    path and the code path agree on where the 3-mer boundaries fall.

Two equal paths
    :func:`build_tokenizer` is a real Hugging Face fast tokenizer (``tokenizers``
    WordLevel model) that does all of the above itself: its normalizer folds case and
    adds the flanks (the frame offset is applied by prepending the upstream flank
    without its first ``f`` bases), its pre-tokenizer cuts 3-mers, its post-processor
    adds [CLS] ... [SEP]. It saves with ``save_pretrained`` and reloads offline with
    ``AutoTokenizer.from_pretrained``. :func:`encode_codes` is the vectorised numpy path
    the data loader uses on alphabet codes; it gives exactly the same ids. One edge
    differs and is refused instead: the ``tokenizers`` normalizer leaves an empty
    string empty (no flanks), so :func:`encode_codes` rejects rows of length 0.

Truncation (``max_tokens`` in :func:`encode_codes`)
    ``max_tokens`` counts every position, [CLS] and [SEP] included. A row with more than
    ``max_tokens - 2`` 3-mers keeps its first ``max_tokens - 2`` (the 3' end is cut)
    and still ends in [SEP]; shorter rows are padded to ``max_tokens``. This is what
    the HF tokenizer does with ``padding="max_length", truncation=True,
    max_length=max_tokens``.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported where used: the loader's numpy path needs neither library
    from transformers import PreTrainedTokenizerFast

from .alphabet import (
    ADAPTER_3P,
    ADAPTER_5P,
    BASES,
    DOWNSTREAM_150,
    PAD,
    UPSTREAM_150,
    encode,
)
from .dream import gather_windows

SPECIAL_TOKENS = ["[PAD]", "[CLS]", "[UNK]", "[SEP]", "[MASK]"]
PAD_ID, CLS_ID, UNK_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))
K = 3
NUM_KMERS = len(BASES) ** K  # 125
VOCAB_SIZE = len(SPECIAL_TOKENS) + NUM_KMERS  # 130
FRAMES = (0, 1, 2)

#: Vector bases added before / after a row: the 150-bp flanks without the adapters
#: the row already carries (133 and 137 bp).
UPSTREAM_FLANK = UPSTREAM_150[: -len(ADAPTER_5P)]
DOWNSTREAM_FLANK = DOWNSTREAM_150[len(ADAPTER_3P) :]
EXTENSION = len(UPSTREAM_FLANK) + len(DOWNSTREAM_FLANK)  # 270

#: The published extension on each side of a row, its own adapters included (bp).
FULL_FLANK_BP = 150
#: The shortest: two vector bases before the 5' adapter, which frames 1 and 2 skip.
MIN_FLANK_BP = len(ADAPTER_5P) + 2


def check_flank_bp(flank_bp: int) -> None:
    """ValueError unless ``flank_bp`` is in ``MIN_FLANK_BP..FULL_FLANK_BP``."""
    if isinstance(flank_bp, bool) or not isinstance(flank_bp, int) or not MIN_FLANK_BP <= flank_bp <= FULL_FLANK_BP:
        raise ValueError(f"flank_bp must be an integer in {MIN_FLANK_BP}..{FULL_FLANK_BP}, not {flank_bp!r}")


def vector_flanks(flank_bp: int = FULL_FLANK_BP) -> tuple[str, str]:
    """The vector bases added before and after a row: the ``flank_bp - 17`` / ``flank_bp - 13`` next to it."""
    check_flank_bp(flank_bp)
    return (UPSTREAM_FLANK[len(UPSTREAM_FLANK) - (flank_bp - len(ADAPTER_5P)) :],
            DOWNSTREAM_FLANK[: flank_bp - len(ADAPTER_3P)])


def extension_bp(flank_bp: int = FULL_FLANK_BP) -> int:
    """Vector bases added to a row in all (270 at the published 150 bp a side)."""
    return sum(map(len, vector_flanks(flank_bp)))


# Codes are clipped to 0..5 (5 = anything that is not a base: PAD or INVALID) and a
# 3-mer is looked up as 36*c0 + 6*c1 + c2 (at most 215, so uint8 arithmetic is exact).
_BAD = 5
_TRIPLE_LUT = np.full(6**K, UNK_ID, dtype=np.int64)
for _c0, _c1, _c2 in itertools.product(range(len(BASES)), repeat=K):
    _TRIPLE_LUT[36 * _c0 + 6 * _c1 + _c2] = len(SPECIAL_TOKENS) + 25 * _c0 + 5 * _c1 + _c2


def kmer_vocabulary() -> dict[str, int]:
    """Token -> id for all 130 tokens (specials 0-4, then the 3-mers in ACGTN order)."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for kmer in itertools.product(BASES, repeat=K):
        vocab["".join(kmer)] = len(vocab)
    return vocab


def extend_with_vector(sequence: str, flank_bp: int = FULL_FLANK_BP) -> str:
    """The row inside its plasmid context: ``UPSTREAM_150[:-17] + row + DOWNSTREAM_150[13:]`` at 150 bp a side.

    The row is kept as given (its own adapters, its case); a 110-bp row gives 380 bp
    (``flank_bp``: see the module docstring).
    """
    upstream, downstream = vector_flanks(flank_bp)
    return upstream + sequence + downstream


def kmer_count(length: int | np.ndarray, frame: int = 0, flank_bp: int = FULL_FLANK_BP) -> int | np.ndarray:
    """Number of 3-mers (specials not counted) a row of ``length`` bases gives in ``frame``."""
    _check_frame(frame)
    return (length + extension_bp(flank_bp) - frame) // K


def split_kmers(sequence: str, frame: int = 0, flank_bp: int = FULL_FLANK_BP) -> list[str]:
    """The 3-mers of a row in ``frame`` as strings (upper-cased, not yet mapped to ids).

    A plain-Python statement of the rule both tokenizer paths implement.
    """
    _check_frame(frame)
    extended = extend_with_vector(_fold_case(sequence), flank_bp)
    stop = frame + (len(extended) - frame) // K * K
    return [extended[i : i + K] for i in range(frame, stop, K)]


def build_tokenizer(frame: int = 0, model_max_length: int = 512,
                    flank_bp: int = FULL_FLANK_BP) -> PreTrainedTokenizerFast:
    """A Hugging Face fast tokenizer that turns a raw row into [CLS] 3-mers... [SEP] ids.

    The vector extension, the frame offset and case folding all live inside the
    tokenizer (normalizer), so ``tok(row)`` on a row as read from the file gives the
    same ids as :func:`encode_codes` on its codes, and the saved tokenizer needs no
    code from this package to reload.
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    _check_frame(frame)
    upstream, downstream = vector_flanks(flank_bp)
    backend = Tokenizer(models.WordLevel(vocab=kmer_vocabulary(), unk_token="[UNK]"))
    backend.normalizer = normalizers.Sequence(
        # Fold only the five base letters: other letters become [UNK] either way, and
        # folding nothing else keeps the string path equal to alphabet.ENCODE_LUT.
        [normalizers.Replace(base.lower(), base) for base in BASES]
        + [
            # The frame offset is applied here: the first `frame` bases of the extended
            # sequence are vector bases, so prepending the flank without them is the same.
            normalizers.Prepend(upstream[frame:]),
            # `\z` is the zero-width end of the string: a literal append.
            normalizers.Replace(Regex(r"\z"), downstream),
        ]
    )
    # Keep every run of 3 characters (any character, newline included) and drop what
    # is left over at the end: `invert=True` keeps the matches, "removed" drops the rest.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]{3}"), behavior="removed", invert=True)
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", CLS_ID), ("[SEP]", SEP_ID)],
    )
    # Decoding joins the 3-mers back into the (framed, extended) sequence.
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=model_max_length,
        pad_token="[PAD]",
        cls_token="[CLS]",
        unk_token="[UNK]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        padding_side="right",
        truncation_side="right",
        # BERT needs no token types for single sequences.
        model_input_names=["input_ids", "attention_mask"],
    )


def build_frame_tokenizers(model_max_length: int = 512,
                           flank_bp: int = FULL_FLANK_BP) -> list[PreTrainedTokenizerFast]:
    """One tokenizer per reading frame, in frame order 0, 1, 2."""
    return [build_tokenizer(frame, model_max_length, flank_bp) for frame in FRAMES]


def encode_codes(
    codes: np.ndarray, lengths: np.ndarray, frame: int = 0, max_tokens: int | None = None,
    flank_bp: int = FULL_FLANK_BP,
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask for a batch of coded rows, without a loop over rows.

    ``codes`` is uint8 (n, W) in alphabet coding with PAD beyond each row's length;
    ``lengths`` (n,) are the row lengths. Returns ``input_ids`` and ``attention_mask``,
    both int64 (n, T): [CLS], the row's 3-mers in ``frame``, [SEP], then [PAD] (mask 0).
    T is the longest row's token count, or ``max_tokens`` (see the module docstring for
    the truncation rule). Any code other than A C G T N inside a row gives [UNK].
    """
    _check_frame(frame)
    codes, lengths = _checked(codes, lengths)
    return _row_frame_ids(codes, lengths, frame, max_tokens, _flanked(flank_bp))


def encode_for_model(
    codes: np.ndarray, lengths: np.ndarray, frame: int = 0, all_frames: bool = False,
    flank_bp: int = FULL_FLANK_BP,
) -> tuple[np.ndarray, np.ndarray]:
    """The BERT inputs of a run: (n, T) ids and mask in ``frame``, or (n, 3, T) in every frame."""
    if all_frames:
        return encode_codes_all_frames(codes, lengths, flank_bp=flank_bp)
    return encode_codes(codes, lengths, frame=frame, flank_bp=flank_bp)


def encode_codes_all_frames(
    codes: np.ndarray, lengths: np.ndarray, max_tokens: int | None = None, flank_bp: int = FULL_FLANK_BP,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`encode_codes` for frames 0, 1, 2 at once: int64 (n, 3, T) ids and mask.

    T is shared by the three frames (the longest count over frames and rows, or
    ``max_tokens``) so the three sequences stack into one tensor.
    """
    flanked = _flanked(flank_bp)
    codes, lengths = _checked(codes, lengths)
    if max_tokens is None:
        max_tokens = (int(lengths.max(initial=0)) + flanked.extension) // K + 2
    per_frame = [_row_frame_ids(codes, lengths, frame, max_tokens, flanked) for frame in FRAMES]
    ids = np.stack([p[0] for p in per_frame], axis=1)
    mask = np.stack([p[1] for p in per_frame], axis=1)
    return ids, mask


def _check_frame(frame: int) -> None:
    if frame not in FRAMES:
        raise ValueError(f"frame must be 0, 1 or 2, not {frame!r}")


def _fold_case(sequence: str) -> str:
    return sequence.translate(str.maketrans(BASES.lower(), BASES))


def _checked(codes: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``codes`` (n, W) and int64 ``lengths`` (n,) in 1..W, or ValueError."""
    codes = np.asarray(codes)
    lengths = np.asarray(lengths, dtype=np.int64)
    if codes.ndim != 2 or lengths.shape != (codes.shape[0],):
        raise ValueError(f"codes must be (n, W) and lengths (n,); got {codes.shape} and {lengths.shape}")
    n, width = codes.shape
    if n and (lengths.min() < 1 or lengths.max() > width):
        raise ValueError(f"row lengths must lie in 1..{width} (the codes' width)")
    return codes, lengths


_TRIPLE_LUT8 = _TRIPLE_LUT.astype(np.uint8)  # ids < 256: rows are built in bytes, widened once at the end


def _triple_ids(codes: np.ndarray) -> np.ndarray:
    """Ids of consecutive 3-mers of uint8 codes clipped to 0..5, (..., 3m) -> (..., m) uint8."""
    index = codes[..., 0::K] * np.uint8(36)  # at most 215: exact in uint8
    index += codes[..., 1::K] * np.uint8(6)
    index += codes[..., 2::K]
    return np.take(_TRIPLE_LUT8, index)


def _frame_layout(up_codes: np.ndarray, down_codes: np.ndarray, frame: int
                  ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """What a frame's tokens hold besides the row: the upstream flank's whole 3-mers (ids), the
    flank bases left over before the row (codes), and per phase p = (those + row bases) % 3 the
    ids after the row (a slot for the 3-mer across the row's end if p, the downstream flank's
    whole 3-mers, [SEP])."""
    up = len(up_codes)
    whole = (up - frame) // K
    up_ids = _triple_ids(up_codes[frame : frame + K * whole])
    lead = up_codes[frame + K * whole :]
    tails = []
    for phase in range(K):
        skip = (K - phase) % K  # downstream bases in the 3-mer across the row's end
        down = down_codes[skip:]
        ids = _triple_ids(down[: len(down) // K * K])
        tails.append(np.concatenate([[UNK_ID] if phase else [], ids, [SEP_ID]]).astype(np.uint8))
    return up_ids, lead, tails


_CODES = np.arange(_BAD + 1, dtype=np.uint8)


@dataclass(frozen=True)
class _Flanked:
    """The constant parts of the tokens of one flank length (:func:`_flanked`)."""

    flank_bp: int
    extension: int
    """Vector bases added to a row."""
    layouts: dict[int, tuple[np.ndarray, np.ndarray, list[np.ndarray]]]
    """Per frame: :func:`_frame_layout`."""
    tail_tokens: dict[int, np.ndarray]
    """Per frame and phase: the downstream flank's whole 3-mers after a row (the slot across its end and [SEP] not
    counted)."""
    across_1: np.ndarray
    """Id of the 3-mer across a row's end holding its last base (index: that base's code)."""
    across_2: np.ndarray
    """Id of the 3-mer across a row's end holding its last two bases (index: 6 * code before last + last)."""


@functools.lru_cache(maxsize=None)  # a run uses one flank length; tests a few
def _flanked(flank_bp: int) -> _Flanked:
    upstream, downstream = vector_flanks(flank_bp)
    up_codes, down_codes = encode(upstream), encode(downstream)
    layouts = {frame: _frame_layout(up_codes, down_codes, frame) for frame in FRAMES}
    return _Flanked(
        flank_bp=flank_bp,
        extension=len(upstream) + len(downstream),
        layouts=layouts,
        tail_tokens={frame: np.array([len(t) - 1 - (p > 0) for p, t in enumerate(layouts[frame][2])])
                     for frame in FRAMES},
        across_1=_TRIPLE_LUT8[36 * _CODES + 6 * down_codes[0] + down_codes[1]],
        across_2=_TRIPLE_LUT8[36 * _CODES[:, None] + 6 * _CODES[None, :] + down_codes[0]].ravel(),
    )


_ROW_TABLES: dict[tuple[int, int, int, int], np.ndarray] = {}


def _row_table(flanked: _Flanked, frame: int, most: int, natural: int) -> np.ndarray:
    """(K * (most + 1), natural) uint8: row ``p * (most + 1) + w`` is [CLS], the upstream flank's 3-mers,
    ``w`` PADs (where a row's own ``w`` 3-mers go), then the tail of phase ``p`` (:func:`_frame_layout`),
    then PADs. One gather of its rows lays out a batch but for the rows' own 3-mers.

    Batches share a few shapes, so the tables are kept (a few tens of KB each).
    """
    key = (flanked.flank_bp, frame, most, natural)
    if key not in _ROW_TABLES:
        if len(_ROW_TABLES) > 64:  # bounded: rows of unusual lengths could make many shapes
            _ROW_TABLES.clear()
        up_ids, _, tails = flanked.layouts[frame]
        table = np.zeros((K * (most + 1), natural), dtype=np.uint8)
        table[:, 0] = CLS_ID
        table[:, 1 : 1 + len(up_ids)] = up_ids
        start = 1 + len(up_ids)
        for p, tail in enumerate(tails):
            for w in range(most + 1):
                shown = tail[: max(natural - start - w, 0)]
                table[p * (most + 1) + w, start + w : start + w + len(shown)] = shown
        _ROW_TABLES[key] = table
    return _ROW_TABLES[key]


_KEEP_TABLES: dict[int, np.ndarray] = {}


def _keep_table(most: int) -> np.ndarray:
    """``most`` bytes of 0xFF then ``most`` zeros: its window at ``most - w`` keeps a row's first ``w`` 3-mers."""
    if most not in _KEEP_TABLES:
        if len(_KEEP_TABLES) > 64:
            _KEEP_TABLES.clear()
        _KEEP_TABLES[most] = np.concatenate([np.full(most, 0xFF, np.uint8), np.zeros(most, np.uint8)])
    return _KEEP_TABLES[most]


def _row_frame_ids(codes: np.ndarray, lengths: np.ndarray, frame: int, max_tokens: int | None,
                   flanked: _Flanked) -> tuple[np.ndarray, np.ndarray]:
    """[CLS] 3-mers [SEP] [PAD]... of one frame, computed on the rows only.

    The flanks are the same for every row: the upstream flank's whole 3-mers are one
    constant run, and what follows a row depends only on where its last 3-mer ends (three
    phases), so a batch is laid out by one gather of rows of a constant table
    (:func:`_row_table`, by phase and 3-mer count) and only the row's own 3-mers (and the
    one across its end) are looked up, read in place from ``codes`` as strided columns.
    """
    n, width = codes.shape
    up_ids, lead, _ = flanked.layouts[frame]
    lead_len = len(lead)
    core_len = lead_len + lengths  # the row with the flank bases before its first 3-mer
    whole = core_len // K  # 3-mers within lead + row
    phase = core_len - K * whole
    counts = len(up_ids) + whole + (phase > 0) + flanked.tail_tokens[frame][phase]
    natural = int(counts.max(initial=0)) + 2
    total = natural if max_tokens is None else int(max_tokens)
    if total < 2:
        raise ValueError(f"max_tokens must be at least 2 ([CLS] and [SEP]), not {max_tokens}")
    # Codes clipped to 0..5 (INVALID and a stray PAD inside a row become [UNK]); the loader's are already.
    if codes.dtype != np.uint8:
        codes = np.minimum(codes, _BAD).astype(np.uint8)
    elif n and width and int(codes.max()) > _BAD:
        codes = np.minimum(codes, np.uint8(_BAD))
    if width < K:  # so that the 3-mer holding the lead has its row bases as columns (rows this short: none whole)
        codes = np.concatenate([codes, np.full((n, K - width), _BAD, np.uint8)], axis=1)
    most = int(whole.max(initial=0))
    first = int(lead_len > 0)  # a lead makes the first 3-mer lead + the row's first bases
    skip = (K - lead_len) % K  # the row's bases in that 3-mer
    row_ids = np.empty((n, most), dtype=np.uint8)
    if first and most:
        index = np.full(n, 36 * int(lead[0]), dtype=np.uint8)
        index += (lead[1] if lead_len == 2 else codes[:, 0]) * np.uint8(6)
        index += codes[:, skip - 1]
        row_ids[:, 0] = np.take(_TRIPLE_LUT8, index)
    if most > first:
        row_ids[:, first:] = _triple_ids(codes[:, skip : skip + K * (most - first)])

    ids = _row_table(flanked, frame, most, natural)[phase * (most + 1) + whole]  # PADs where the row's 3-mers go
    start = 1 + len(up_ids)
    # The row's own 3-mers into those PADs (PAD_ID is 0): ANDed with a 0xFF/0 window, then ORed in,
    # cheaper than a copy under a boolean mask.
    mine = gather_windows(_keep_table(most), most - whole, most)
    np.bitwise_and(mine, row_ids, out=mine)
    np.bitwise_or(ids[:, start : start + most], mine, out=ids[:, start : start + most])
    # The 3-mer across the row's end: its last lead/row bases, then the first downstream bases.
    cross = np.flatnonzero(phase > 0)
    if len(cross):
        last, before = _last_bases(codes, lead, cross, core_len[cross] - 1)
        ids[cross, start + whole[cross]] = np.where(phase[cross] == 1, flanked.across_1[last],
                                                    flanked.across_2[6 * before.astype(np.intp) + last])

    if total != natural:  # max_tokens: cut long rows (keeping [SEP] last) or pad short ones
        kept = np.zeros((n, total), dtype=np.uint8)
        kept[:, : min(total, natural)] = ids[:, : min(total, natural)]
        cut = counts > total - 2
        kept[cut, total - 1] = SEP_ID
        counts = np.minimum(counts, total - 2)
        ids = kept
    # Both outputs in one allocation: two fresh ~1 MB arrays per batch made malloc map and unmap pages
    # each time (measured: 0.43 ms against 0.06 ms for 1,024 rows).
    out = np.empty((2, n, total), dtype=np.int64)
    out[0] = ids
    np.not_equal(ids, PAD_ID, out=out[1], casting="unsafe")  # ones through [SEP]: no PAD before it
    return out[0], out[1]


def _last_bases(codes: np.ndarray, lead: np.ndarray, rows: np.ndarray, at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The codes at positions ``at`` and ``at - 1`` of lead + row for ``rows`` (a position before the row is a
    lead base; ``at - 1`` is -1 only for a 1-base core, whose base before is never used)."""
    flat = codes.reshape(-1)  # one take from the flat codes: cheaper than a 2-D index
    where = rows * codes.shape[1] + at - len(lead)
    last = np.take(flat, np.maximum(where, 0))
    before = np.take(flat, np.maximum(where - 1, 0))
    if len(lead) and int(at.min(initial=len(lead))) <= len(lead):  # rows of a base or two: rare
        for bases, position in ((last, at), (before, at - 1)):
            in_lead = np.flatnonzero(position < len(lead))
            bases[in_lead] = lead[np.maximum(position[in_lead], 0)]
    return last, before


# The base codes this module relies on (PAD must be above every base for the clip).
assert PAD == _BAD and BASES == "ACGTN" and PAD_ID == 0
