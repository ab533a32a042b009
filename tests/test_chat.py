"""Chat models and `messages` data (README 'Chat models and `messages` data').

Real tokenizers with their real chat templates: Qwen2.5's (the tiny-qwen2 teacher) and SmolLM2's (the tiny-smollm2
student, a llama architecture: another family), and GPT-2's, which has none. The checks: conversational records
through every reader, prompts equal to `apply_chat_template`, teacher and student rows that pair the same response
tokens end-of-turn to end-of-turn, cache-fed losses equal to the online teacher's, and a conversational dataset that
caches, distils and evaluates end to end.
"""

import json
import shlex
from pathlib import Path

import pytest
import torch

from conftest import FIXTURES, explain, online_teacher_views, run_cli_commands
from cot2align.cache import open_cache
from cot2align.config import CacheTeacherConfig, build_config
from cot2align.data import load_records
from cot2align.data.chat import cot_messages, end_of_turn, prompt_messages, render_prompt, use_chat_template
from cot2align.errors import ConfigError, DataError
from cot2align.losses.objective import Heads, build_projectors, default_settings, distillation_loss
from cot2align.modeling import bundled_tokenizer_dir, load_model, load_tokenizer, tokenizer_hash
from cot2align.teacher.cache_pass import cache_teacher
from cot2align.teacher.sequences import build_sequences
from cot2align.train.batches import student_view, teacher_view
from cot2align.train.data import DistillDataset, collate, tokenize_cache

CHAT_DATA = FIXTURES / "chat" / "train.jsonl"
TEACHER, STUDENT = "tiny-qwen2", "tiny-smollm2"      # Qwen2.5's template -> SmolLM2's, two vocabularies


def _chat_tokenizer(name: str):
    return use_chat_template(load_tokenizer(name), None, name)


def _ids(tokenizer, messages, **kwargs) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


# ------------------------------------------------------------------------------------------ records

def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_conversation_is_its_prompt_turns_and_its_last_assistant_turn(tmp_path):
    rows = [{"id": "a", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
                                     {"role": "assistant", "content": "4"}]},
            {"id": "b", "prompt": [{"role": "user", "content": "Capital of Peru?"}],
             "completion": [{"role": "assistant", "content": "Lima."}]},
            {"id": "c", "prompt": "Say yes.", "completion": "Yes."}]
    records, _ = load_records(str(_write_jsonl(tmp_path / "d.jsonl", rows)))
    a, b, c = records
    # system turn kept; the earlier assistant turn is context of the prompt; the last one is the response
    assert a["messages"] == rows[0]["messages"][:4] and a["output"] == "4" and a["instruction"] == "2+2?"
    assert b["messages"] == [{"role": "user", "content": "Capital of Peru?"}] and b["output"] == "Lima."
    # TRL's prompt/completion strings are plain instruction data (no turns): the paper's templates by default
    assert "messages" not in c and (c["instruction"], c["output"]) == ("Say yes.", "Yes.")
    # --field-map names another column for the conversation
    mapped, _ = load_records(str(_write_jsonl(tmp_path / "m.jsonl", [{"conv": rows[0]["messages"]}])),
                             field_map={"messages": "conv"})
    assert mapped[0]["messages"] == a["messages"] and mapped[0]["output"] == "4"


@pytest.mark.parametrize("messages,message", [
    ([{"role": "user", "content": "Hi"}], "no assistant turn"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "?"}],
     "turn 3 (user) follows the last assistant turn"),
    ([{"role": "system", "content": "S"}, {"role": "assistant", "content": "Yo"}], "no user turn"),
    ([{"role": "user", "content": ["parts"]}, {"role": "assistant", "content": "Yo"}],
     "turn 1 (user): 'content' must be"),
    ([{"content": "Hi"}], "turn 1: expected an object with a 'role'"),
    ([], "non-empty list"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}], "the last assistant turn is empty"),
])
def test_a_bad_conversation_is_one_line_naming_the_file_line_and_field(tmp_path, messages, message):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "ok"},
                                                               {"role": "assistant", "content": "ok"}]},
                                                 {"messages": messages}])
    with pytest.raises(DataError) as e:
        load_records(str(path))
    text = str(e.value)
    assert "\n" not in text and f"{path}:2" in text and message in text, text
    if "empty" not in message:
        assert "'messages'" in text


def test_every_reader_gives_the_same_conversational_records(tmp_path):
    datasets = pytest.importorskip("datasets")
    expected, _ = load_records(str(CHAT_DATA))
    rows = [json.loads(line) for line in CHAT_DATA.read_text().splitlines()]
    chats = [r for r in rows if "messages" in r]      # one schema per table: the `messages` rows
    want = [r for r in expected if r["id"].startswith("chat-")]
    table = datasets.Dataset.from_list([{"id": r["id"], "messages": r["messages"]} for r in chats])
    table.to_parquet(str(tmp_path / "d.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    # CSV holds text: the conversation as JSON text in its cell
    datasets.Dataset.from_list([{"id": r["id"], "messages": json.dumps(r["messages"])} for r in chats]).to_csv(
        str(tmp_path / "d.csv"))
    strip = [{k: v for k, v in r.items() if k not in ("rationale", "cot_output")} for r in want]
    for source in (str(tmp_path / "d.parquet"), str(tmp_path / "saved"), str(tmp_path / "d.csv"), table):
        got, _ = load_records(source)
        assert got == strip, source


# ------------------------------------------------------------------------------------------ templates

@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-smollm2"])
def test_rendered_prompts_equal_apply_chat_template(name):
    tokenizer = _chat_tokenizer(name)
    assert tokenizer.convert_ids_to_tokens(tokenizer.eos_token_id) == "<|im_end|>"     # end of an assistant turn
    records, _ = load_records(str(CHAT_DATA))
    for record in records:
        for turns in (prompt_messages(record), cot_messages(prompt_messages(record))):
            text = render_prompt(tokenizer, turns)
            assert tokenizer(text, add_special_tokens=True)["input_ids"] == _ids(tokenizer, turns,
                                                                                 add_generation_prompt=True)


def test_a_model_without_a_chat_template_is_refused_in_one_line_or_given_one(tmp_path):
    with pytest.raises(ConfigError, match="tiny-gpt2 has no chat template; pass --chat-template FILE"):
        use_chat_template(load_tokenizer("tiny-gpt2"), None, "tiny-gpt2")
    template = bundled_tokenizer_dir("smollm2") / "chat_template.jinja"
    gpt2 = use_chat_template(load_tokenizer("tiny-gpt2"), str(template), "tiny-gpt2")
    turns = [{"role": "user", "content": "Hi"}]
    assert render_prompt(gpt2, turns).endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    # GPT-2's vocabulary spells "<|im_end|>" in pieces, no token of its own: a response ends in the tokenizer's EOS
    assert end_of_turn(gpt2) == gpt2.eos_token == "<|endoftext|>"
    with pytest.raises(ConfigError, match="--chat-template .*nothing.jinja: cannot be read"):
        use_chat_template(load_tokenizer("tiny-gpt2"), str(tmp_path / "nothing.jinja"), "tiny-gpt2")


def test_a_template_that_refuses_a_records_turns_is_one_line_naming_the_record(tmp_path):
    template = tmp_path / "no_system.jinja"      # as Gemma's: no system role
    template.write_text("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                        "supported') }}{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tokenizer = use_chat_template(load_tokenizer(TEACHER), str(template), TEACHER)
    records, _ = load_records(str(CHAT_DATA))
    with pytest.raises(DataError) as e:
        build_sequences(records, tokenizer, 512, 256, where="chat.jsonl", prompt_format="chat")
    text = str(e.value)
    assert "\n" not in text and text.startswith("chat.jsonl: record 1 (id 'chat-0'), std view: the chat template")
    assert "roles system, user" in text and "System role not supported" in text


def test_teacher_sequences_are_the_templated_conversation_ending_in_end_of_turn():
    tokenizer = _chat_tokenizer(TEACHER)
    records, _ = load_records(str(CHAT_DATA))
    sequences, _ = build_sequences(records, tokenizer, 512, 256, prompt_format="chat")
    for record, seq in zip(records, sequences):
        std = seq.views["std"]
        whole = _ids(tokenizer, [*record["messages"], {"role": "assistant", "content": record["output"]}])
        # the template's assistant turn up to its end-of-turn token (the "\n" after it is not the model's to write)
        assert std.input_ids == whole[:len(std.input_ids)] and std.input_ids[-1] == tokenizer.eos_token_id
        assert std.prompt_len == len(_ids(tokenizer, record["messages"], add_generation_prompt=True))
        assert std.messages == record["messages"]
        assert (seq.views["cot"].n_rows > 0) == ("cot_output" in record)


def test_an_over_long_conversation_loses_its_oldest_turns_then_the_end_of_its_question():
    tokenizer = _chat_tokenizer(TEACHER)
    turns = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        turns += [{"role": "user", "content": f"Question {i}: " + "words " * 20},
                  {"role": "assistant", "content": f"Answer {i}."}]
    record = {"id": "long", "messages": turns + [{"role": "user", "content": "Last question " + "very " * 80}],
              "instruction": "Last question", "input": "", "output": "Done."}
    limit = 90
    (seq,), stats = build_sequences([record], tokenizer, 256, limit, prompt_format="chat")
    kept = seq.views["std"].messages
    assert seq.views["std"].prompt_len <= limit and stats.prompt_truncated["std"] == 1
    assert kept[0] == turns[0] and [t["role"] for t in kept] == ["system", "user"]     # system kept, history gone
    assert kept[1]["content"].startswith("Last question very")
    assert len(kept[1]["content"]) < len(record["messages"][-1]["content"])
    assert tokenizer(seq.views["std"].prompt)["input_ids"] == _ids(tokenizer, kept, add_generation_prompt=True)


# ------------------------------------------------------------------------------------------ cache and student

@pytest.fixture(scope="module")
def chat_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    cfg = build_config(CacheTeacherConfig, model=TEACHER, data=str(CHAT_DATA), out=str(root / "cache"), topk=8,
                       batch_tokens=4096)
    cache_teacher(cfg, log=lambda m: None)
    return root / "cache"


def test_the_cache_keeps_the_turns_and_the_student_renders_them_in_its_own_template(chat_cache):
    cache = open_cache(chat_cache)
    records, _ = load_records(str(CHAT_DATA))
    teacher_tok, student_tok = _chat_tokenizer(TEACHER), _chat_tokenizer(STUDENT)
    assert cache.manifest["data"]["prompt_format"] == "chat"
    assert cache.manifest["tokenizer"]["eos_id"] == teacher_tok.eos_token_id          # <|im_end|>, not <|endoftext|>
    assert cache.messages("std") == [r["messages"] for r in records]
    assert cache.texts()["prompt_std"] == [render_prompt(teacher_tok, r["messages"]) for r in records]
    ids = tokenize_cache(cache, student_tok, tokenizer_hash(student_tok), 512, prompt_format="chat")
    student_eot, teacher_eot = student_tok.eos_token_id, teacher_tok.eos_token_id
    assert student_eot != teacher_eot       # two vocabularies: each side ends with its own end-of-turn token
    for i, record in enumerate(records):
        a, b = ids["std_offsets"][i], ids["std_offsets"][i + 1]
        student = ids["std_ids"][a:b].tolist()
        prompt_len = int(ids["std_prompt_len"][i])
        # the student's prompt is the conversation in SmolLM2's template (its own default system turn and all)
        assert student[:prompt_len] == _ids(student_tok, record["messages"], add_generation_prompt=True)
        response = student_tok(record["output"], add_special_tokens=False)["input_ids"]
        assert student[prompt_len:] == response + [student_eot]
        teacher = cache.view(i, "std", ("target_ids",))["target_ids"].tolist()
        assert teacher == teacher_tok(record["output"], add_special_tokens=False)["input_ids"] + [teacher_eot]
        # the same response text on both sides, end-of-turn to end-of-turn
        assert student_tok.decode(student[prompt_len:-1]) == teacher_tok.decode(teacher[:-1]) == record["output"]


def test_cache_fed_losses_equal_online_ones_with_chat_prompts(chat_cache, method="dskd"):
    cache = open_cache(chat_cache)
    teacher_tok, student_tok = _chat_tokenizer(TEACHER), _chat_tokenizer(STUDENT)
    torch.manual_seed(0)
    student, teacher = load_model(STUDENT), load_model(TEACHER)
    views, examples = ("std", "cot"), [0, 2]           # examples with a rationale: both views have rows
    ids = tokenize_cache(cache, student_tok, tokenizer_hash(student_tok), 512, prompt_format="chat")
    dataset = DistillDataset(ids, views, examples, cache.opened(), ("input_ids", "target_ids", "hidden", "embeds"))
    batch = collate([dataset[k] for k in range(len(examples))], views, student_tok.pad_token_id or 0)
    head = cache.head()
    heads = Heads(student_embed_tokens=student.get_input_embeddings().weight,
                  student_lm_head=student.get_output_embeddings().weight,
                  teacher_embed_tokens=head["embed_tokens"], teacher_lm_head=head["lm_head"])
    students = {v: student_view(student, batch[v], "cpu", True) for v in views}
    cached = {v: teacher_view(batch[v], heads, "cpu", torch.float32) for v in views}
    # the online teacher reads the prompts rendered afresh from the records, not the cache's texts
    records, _ = load_records(str(CHAT_DATA))
    for i in examples:
        assert cache.texts()["prompt_cot"][i] == render_prompt(teacher_tok, cot_messages(records[i]["messages"]))
    online = online_teacher_views(teacher, teacher_tok, cache, examples, views)
    torch.manual_seed(1)
    projectors = build_projectors(method, True, student.config.hidden_size, teacher.config.hidden_size)
    results = [distillation_loss(method, 0.5, students, teachers, heads, projectors, True, default_settings())
               for teachers in (cached, online)]
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for view in views:
        assert torch.equal(cached[view].mask, online[view].mask)
        assert torch.equal(cached[view].target_ids[cached[view].mask], online[view].target_ids[online[view].mask])


def test_a_paper_cache_keeps_its_layout_and_a_chat_student_is_told_to_rebuild_it(tmp_path):
    cfg = build_config(CacheTeacherConfig, model=TEACHER, data="sample", limit=3, out=str(tmp_path / "paper"), topk=4,
                       batch_tokens=4096)
    cache_teacher(cfg, log=lambda m: None)
    cache = open_cache(tmp_path / "paper")
    assert "prompt" not in cache.manifest["fingerprint"]["inputs"] and "messages_std" not in cache.texts()
    assert cache.manifest["data"]["prompt_format"] == "paper"
    with pytest.raises(Exception, match="paper's format .* --prompt-format chat"):
        cache.messages("std")


def test_augment_cot_asks_in_the_teachers_template_stops_at_its_end_of_turn_and_keeps_the_conversation(
        tmp_path, monkeypatch):
    from cot2align.data import augment

    teacher_tok = _chat_tokenizer(TEACHER)
    records, _ = load_records(str(CHAT_DATA))
    seen = []

    def fake_generate(model, tokenizer, encoded, max_new_tokens, greedy, temperature=1.0):
        seen.extend(encoded)      # the teacher writes a rationale, ends its turn (<|im_end|>), then rambles on
        assert tokenizer.convert_ids_to_tokens(tokenizer.eos_token_id) == "<|im_end|>"
        words = tokenizer(" Think it through.", add_special_tokens=False)["input_ids"]
        ramble = tokenizer(" More words.", add_special_tokens=False)["input_ids"]
        return [words + [tokenizer.eos_token_id] + ramble for _ in encoded]

    monkeypatch.setattr(augment, "generate_batch", fake_generate)
    cfg = build_config(augment.AugmentConfig, model=TEACHER, data=str(CHAT_DATA), out=str(tmp_path / "cot.jsonl"),
                       limit=3, batch_size=8)
    augment.augment_cot(cfg, log=lambda m: None)
    wanted = [_ids(teacher_tok, cot_messages(r["messages"]), add_generation_prompt=True) for r in records[:3]]
    assert sorted(seen) == sorted(wanted)
    again = {r["id"]: r for r in load_records(str(tmp_path / "cot.jsonl"))[0]}      # written in length order
    assert len(again) == 3
    for before in records[:3]:
        after = again[before["id"]]
        assert after["messages"] == before["messages"] and after["output"] == before["output"]
        assert after["rationale"] == "Think it through."         # cut at the end of the teacher's turn
        assert after["cot_output"] == "Think it through.\nTherefore, the answer is: " + before["output"]


# ------------------------------------------------------------------------------------------ end to end

def readme_chat_commands() -> list[list[str]]:
    """The commands of the README's 'Chat models and `messages` data' example, as printed."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Chat models and `messages` data", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line)[1:] for line in block.splitlines() if line.startswith("cot2align ")]


@pytest.mark.slow
def test_a_conversational_dataset_caches_distils_and_evaluates_end_to_end(tmp_path):
    """The README's commands as printed: a Qwen2.5-template teacher -> a SmolLM2-template student, every prompt
    format by default (the data is conversational); then a greedy evaluation that generates in the chat format."""
    commands = readme_chat_commands()
    assert [c[0] for c in commands] == ["cache-teacher", "distill", "evaluate", "sft"]
    (tmp_path / "tests").symlink_to(FIXTURES.parent)       # the README runs from a clone of the repository
    result = run_cli_commands(tmp_path, [*commands, [
        "evaluate", "--model", "runs/chat_student", "--data", "tests/fixtures/chat/train.jsonl", "--greedy",
        "--max-new-tokens", "4", "--limit", "3", "--out", "runs/chat_student/eval/greedy", "-q"]])
    assert result.returncode == 0, explain(result)
    run = tmp_path / "runs" / "chat_student"
    assert "prompt_format: chat" in (run / "config.yaml").read_text()
    assert "prompt_format: chat" in (tmp_path / "runs" / "chat_sft" / "config.yaml").read_text()
    saved = load_tokenizer(str(run))          # the saved student carries the template it was trained with
    assert saved.chat_template == load_tokenizer(STUDENT).chat_template and saved.eos_token == "<|im_end|>"
    assert "| prompt format | chat:" in (run / "README.md").read_text()
    results = json.loads((run / "eval" / "train_test" / "results.json").read_text())
    assert results["prompt_format"] == "chat" and results["ce"]["n_pairs"] == 12
    greedy = (run / "eval" / "greedy" / "greedy.jsonl").read_text().splitlines()
    assert len(greedy) == 3 and all("<|im" not in json.loads(line)["prediction"] for line in greedy)


def test_chat_for_a_student_without_a_template_is_one_line(tmp_path):
    result = run_cli_commands(tmp_path, [["sft", "--model", "tiny-gpt2", "--data", str(CHAT_DATA), "--max-steps", "1",
                                          "--out", "runs/x", "-q"]])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --prompt-format chat: tiny-gpt2 has no chat template; pass --chat-template FILE (a Jinja template) or "
        "--prompt-format paper")
