"""MinED token alignment (Wan et al. 2024, FuseLLM; as used by DSKD's min_edit_dis_kld): DTW over token
strings with edit-distance cost, then the one-to-one student -> teacher position map used by the loss.

DTW: with c[i, j] = Levenshtein(teacher_i, student_j) over normalised token strings (see align/vocab.py),

    D[i, j] = c[i, j] + min(D[i-1, j], D[i, j-1], D[i-1, j-1]),      D[0, 0] = c[0, 0]

and the path is traced back from the last pair preferring diagonal, then teacher-step, then student-step
moves (FuseLLM's `dtw`). Our default anchors the path on tokens the two sides share exactly (same
string at the same byte offset of the same text) and runs DTW between anchors — see `dtw_align`. Each row of D is computed at once: unrolling the within-row recursion gives
D[i, j] = S[j] + min_{k<=j}(e[k] − S[k−1]) with S the running sum of c[i, ·] and e[k] = min(D[i−1, k],
D[i−1, k−1]), i.e. a cumulative minimum — so the O(n·m) table costs O(n) numpy operations.
"""

from __future__ import annotations

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

VERSION = 1     # of the row alignment (memoised MinED rows are keyed by it)


def edit_distance_matrix(teacher_tokens: list[str], student_tokens: list[str]) -> np.ndarray:
    """c[i, j] = Levenshtein distance between teacher token i and student token j (float64 [n_t, n_s])."""
    if not teacher_tokens or not student_tokens:
        return np.zeros((len(teacher_tokens), len(student_tokens)))
    return process.cdist(teacher_tokens, student_tokens, scorer=Levenshtein.distance, dtype=np.int32, workers=1).astype(np.float64)


def dtw_table(cost: np.ndarray) -> np.ndarray:
    """Accumulated DTW cost D [n, m] of a cost matrix [n, m] (row-vectorised, see module docstring)."""
    n, m = cost.shape
    table = np.empty((n, m))
    previous = np.full(m + 1, np.inf)      # D[i-1, -1..m-1] with D[-1, -1] = 0 as the start
    previous[0] = 0.0
    for i in range(n):
        entry = np.minimum(previous[1:], previous[:-1])            # e[j] = min(D[i-1, j], D[i-1, j-1])
        running = np.cumsum(cost[i])                               # S[j]
        shifted = np.concatenate(([0.0], running[:-1]))            # S[j-1]
        table[i] = running + np.minimum.accumulate(entry - shifted)
        previous = np.concatenate(([np.inf], table[i]))
    return table


def _dtw_path(student_tokens: list[str], teacher_tokens: list[str]) -> list[tuple[int, int]]:
    """Plain DTW (FuseLLM's): the path as (i_student, j_teacher) pairs from (0, 0) to the last pair."""
    table = dtw_table(edit_distance_matrix(teacher_tokens, student_tokens))
    rows = table.tolist()
    inf = float("inf")
    i, j = len(teacher_tokens) - 1, len(student_tokens) - 1
    path = [(j, i)]
    while i > 0 or j > 0:
        diagonal = rows[i - 1][j - 1] if i > 0 and j > 0 else inf
        teacher_step = rows[i - 1][j] if i > 0 else inf
        student_step = rows[i][j - 1] if j > 0 else inf
        best = min(diagonal, teacher_step, student_step)
        if diagonal == best:
            i, j = i - 1, j - 1
        elif teacher_step == best:
            i -= 1
        else:
            j -= 1
        path.append((j, i))
    path.reverse()
    return path


def shared_tokens(student_tokens: list[str], teacher_tokens: list[str]) -> list[tuple[int, int]]:
    """(i, j) where both tokenizations have the same token at the same byte offset of the same text.

    Empty when the two token sequences do not spell the same bytes (one leading space of a SentencePiece
    dummy prefix is allowed on either side).
    """
    joined_s, joined_t = "".join(student_tokens), "".join(teacher_tokens)
    if joined_s == joined_t:
        shift_s = shift_t = 0
    elif joined_s == " " + joined_t:
        shift_s, shift_t = 1, 0
    elif joined_t == " " + joined_s:
        shift_s, shift_t = 0, 1
    else:
        return []

    def starts(tokens, shift):
        out, position = [], -shift
        for token in tokens:
            out.append(position)
            position += len(token)
        return out

    teacher_at = {(start, token): j for j, (start, token) in enumerate(zip(starts(teacher_tokens, shift_t), teacher_tokens))
                  if token.strip()}
    return [(i, teacher_at[(start, token)]) for i, (start, token) in enumerate(zip(starts(student_tokens, shift_s), student_tokens))
            if (start, token) in teacher_at]


def dtw_align(student_tokens: list[str], teacher_tokens: list[str], anchored: bool = True) -> list[tuple[int, int]]:
    """The DTW path as (i_student, j_teacher) pairs, increasing in both, covering both sequences (README 'Methods').

    anchored (default): when both sides spell the same text, tokens identical in string and byte offset
    are fixed as pairs and DTW runs between consecutive anchors. Plain DTW (anchored=False, FuseLLM's)
    can walk past such a pair — a long token on one side makes repeating it expensive, so the path stays
    diagonal and drifts (e.g. ":" paired with "ve" after "déjà vu: naïve"); anchoring removes that drift.
    """
    if not student_tokens or not teacher_tokens:
        return []
    last = (len(student_tokens) - 1, len(teacher_tokens) - 1)
    points = [(0, 0)] + (shared_tokens(student_tokens, teacher_tokens) if anchored else []) + [last]
    path: list[tuple[int, int]] = []
    for (i0, j0), (i1, j1) in zip(points, points[1:]):
        if (i0, j0) == (i1, j1):
            continue
        segment = _dtw_path(student_tokens[i0:i1 + 1], teacher_tokens[j0:j1 + 1])
        segment = [(i + i0, j + j0) for i, j in segment]
        path.extend(segment if not path else segment[1:])
    return path or [(0, 0)]


def aligned_teacher_rows(student_ids, teacher_ids, student_strings: list[str], teacher_strings: list[str],
                         tea2stu: np.ndarray) -> np.ndarray:
    """For each student response row, the teacher row whose distribution it learns from, or -1.

    student_ids / teacher_ids: the *input* token of each response row (DSKD aligns the tokens at the rows).
    A student row gets teacher row j when DTW pairs it with exactly one teacher row j and the vocabulary
    map agrees that the two tokens are the same (tea2stu[teacher id] == student id); otherwise -1, and the
    loss uses a one-hot target on the student's gold token there (DSKD's `transform_step_logits_fast`).
    """
    student_ids = np.asarray(student_ids, dtype=np.int64)
    teacher_ids = np.asarray(teacher_ids, dtype=np.int64)
    rows = np.full(len(student_ids), -1, dtype=np.int64)
    if len(student_ids) == 0 or len(teacher_ids) == 0:
        return rows
    path = dtw_align([_string(student_strings, t) for t in student_ids], [_string(teacher_strings, t) for t in teacher_ids])
    partners = np.zeros(len(student_ids), dtype=np.int64)
    partner = np.full(len(student_ids), -1, dtype=np.int64)
    for i_student, j_teacher in path:
        partners[i_student] += 1
        partner[i_student] = j_teacher
    one_to_one = partners == 1
    mapped = np.where(teacher_ids < len(tea2stu), tea2stu[np.minimum(teacher_ids, len(tea2stu) - 1)], -1)
    same_token = mapped[partner] == student_ids
    rows[one_to_one & same_token] = partner[one_to_one & same_token]
    return rows


def _string(strings: list[str], token_id: int) -> str:
    return strings[token_id] if 0 <= token_id < len(strings) else ""
