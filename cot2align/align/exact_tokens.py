"""The exact-match vocabulary of GOLD: student and teacher tokens that stand for the same bytes.

GOLD (TRL's cross-tokenizer trainer) compares the two models' probabilities token by token where the two
vocabularies share a token, and by sorted ranks (ULD) everywhere else. Which tokens are shared is decided
here, once per tokenizer pair:

  * two tokens match when they stand for the same bytes (`align.vocab.token_strings`: "Ġhello" and "▁hello"
    are both " hello"). TRL compares the raw vocabulary strings instead, which is the same for two byte-level
    BPE tokenizers and misses every match between a byte-level and a SentencePiece one;
  * the map is one-to-one: when one side spells the same bytes with several ids, its highest id is the one
    compared. Among the bundled tokenizers only SentencePiece ones do that, a byte-fallback token ("<0x31>", ids
    3-258) and the ordinary piece ("1") that the tokenizer actually produces, which comes later;
  * special tokens match by role (the student's end-of-sequence is the teacher's, whatever each one spells),
    because a response's final EOS is aligned as its own chunk and "the text ends here" is the same event for
    both models. TRL matches them only when the strings happen to coincide.

`n_teacher_tokens` counts the teacher tokenizer's tokens, not its head's rows: a model head is often padded
(Qwen2.5 has 151,665 tokens and 151,936 outputs), and GOLD's adaptive weight, shared tokens / teacher tokens,
must describe the tokenizers, not how a checkpoint padded its matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cot2align.align.vocab import SPECIAL_ROLES, token_strings


@dataclass(frozen=True)
class ExactTokenMap:
    """stu2tea [V_s tokens]: the teacher id with the same bytes as each student id, −1 when none (one-to-one);
    n_matched: how many student ids have one; n_teacher_tokens: the teacher tokenizer's number of tokens."""

    stu2tea: np.ndarray
    n_matched: int
    n_teacher_tokens: int

    @property
    def adaptive_matched_weight(self) -> float:
        """TRL's adaptive weight of the matched part: shared tokens / teacher tokens."""
        return self.n_matched / max(self.n_teacher_tokens, 1)


def build_exact_token_map(teacher_strings: list[str], student_strings: list[str],
                          special_pairs: dict[int, int] | None = None) -> ExactTokenMap:
    """The one-to-one exact map from normalised token strings ("" = a hole in the id space, never matched);
    special_pairs {teacher id: student id} match by role and take precedence over string matches."""
    last_teacher = {s: t_id for t_id, s in enumerate(teacher_strings) if s}        # later ids overwrite earlier
    last_student = {s: s_id for s_id, s in enumerate(student_strings) if s}
    stu2tea = np.full(len(student_strings), -1, dtype=np.int64)
    for s, s_id in last_student.items():
        stu2tea[s_id] = last_teacher.get(s, -1)
    for t_id, s_id in (special_pairs or {}).items():
        if not (0 <= s_id < len(stu2tea) and 0 <= t_id < len(teacher_strings)):
            continue
        stu2tea[stu2tea == t_id] = -1                 # the teacher id leaves any string partner it had
        stu2tea[s_id] = t_id
    n_teacher = sum(1 for s in teacher_strings if s)
    return ExactTokenMap(stu2tea, int((stu2tea >= 0).sum()), n_teacher)


def special_role_pairs(teacher_tok, student_tok) -> dict[int, int]:
    """{teacher id: student id} for the special roles both tokenizers define (eos first), each id used once."""
    pairs: dict[int, int] = {}
    used_students: set[int] = set()
    for role in SPECIAL_ROLES:
        t_id, s_id = getattr(teacher_tok, role, None), getattr(student_tok, role, None)
        if t_id is None or s_id is None or int(t_id) in pairs or int(s_id) in used_students:
            continue
        pairs[int(t_id)] = int(s_id)
        used_students.add(int(s_id))
    return pairs


def exact_token_map(teacher_tok, student_tok) -> ExactTokenMap:
    """The exact-match map of two tokenizers (a dictionary pass over both vocabularies: well under a second)."""
    return build_exact_token_map(token_strings(teacher_tok), token_strings(student_tok),
                                 special_role_pairs(teacher_tok, student_tok))
