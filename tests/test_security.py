"""The security rules, enforced on the source tree (ast, not grep) so a regression fails a test:

* no pickle: no pickle-family import; every torch.load with weights_only=True; np.load never allow_pickle=True;
* YAML only through yaml.safe_load (no yaml.load / full_load / unsafe_load, no Loader classes);
* no shell: no shell=True in subprocess calls, no os.system / os.popen / create_subprocess_shell; no eval/exec;
* trust_remote_code only from the explicit flag or API argument: every value passed is False, the parameter
  of the enclosing function, or cfg.trust_remote_code; it is never read out of a dict (a manifest, a YAML
  file: x["trust_remote_code"], x.get("trust_remote_code"), getattr), never assigned to an attribute, and
  defaults to False wherever it is declared.

The rule checker is itself tested on small snippets that break each rule.
"""

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = sorted(p for top in ("cot2align", "bench") for p in (ROOT / top).rglob("*.py"))

PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
UNSAFE_YAML = {"load", "load_all", "full_load", "full_load_all", "unsafe_load", "unsafe_load_all", "Loader",
               "FullLoader", "UnsafeLoader", "CLoader", "CFullLoader", "CUnsafeLoader"}
ALWAYS_SHELL = {"os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput",
                "asyncio.create_subprocess_shell"}
SUBPROCESS_CALLS = {"subprocess.run", "subprocess.call", "subprocess.check_call", "subprocess.check_output",
                    "subprocess.Popen"}
TRUST = "trust_remote_code"
CONFIG_NAMES = {"cfg", "config"}     # the resolved config dataclass, built from flags and the user's --config


FIELD_KINDS = ("identity", "runtime", "output")     # config.py's field helpers: a kind around the default


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


class Audit(ast.NodeVisitor):
    def __init__(self, label: str):
        self.label = label
        self.aliases: dict[str, str] = {}     # local name -> dotted module path (import numpy as np: np -> numpy)
        self.params: list[set[str]] = [set()]
        self.violations: list[str] = []

    def flag(self, node, rule: str) -> None:
        self.violations.append(f"{self.label}:{node.lineno}: {rule}")

    def dotted(self, node) -> str | None:
        """The full dotted name of a Name / Attribute chain, through the module's import aliases."""
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            return None
        parts.append(self.aliases.get(node.id, node.id))
        return ".".join(reversed(parts))

    # ----------------------------------------------------------------- imports

    def visit_Import(self, node):
        for alias in node.names:
            if alias.name.split(".")[0] in PICKLE_MODULES:
                self.flag(node, f"imports {alias.name} (pickle)")
            self.aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
        self.generic_visit(node)

    def visit_ImportFrom(self, node):
        module = node.module or ""
        if module.split(".")[0] in PICKLE_MODULES:
            self.flag(node, f"imports from {module} (pickle)")
        for alias in node.names:
            full = f"{module}.{alias.name}"
            if module == "yaml" and alias.name in UNSAFE_YAML:
                self.flag(node, f"imports yaml.{alias.name}")
            self.aliases[alias.asname or alias.name] = full
        self.generic_visit(node)

    # ----------------------------------------------------------------- functions: trust_remote_code parameters

    def _visit_function(self, node):
        args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
        defaults = [None] * (len(node.args.posonlyargs + node.args.args) - len(node.args.defaults)) + node.args.defaults
        defaults += node.args.kw_defaults
        for arg, default in zip(args, defaults):
            if arg.arg == TRUST and not _is_const(default, False):
                self.flag(node, f"parameter {TRUST} must default to False")
        self.params.append({a.arg for a in args})
        self.generic_visit(node)
        self.params.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _visit_function

    def visit_AnnAssign(self, node):            # dataclass fields: `= False`, or `= runtime(False)` (the field's kind)
        value = node.value
        if (isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id in FIELD_KINDS
                and len(value.args) == 1 and not value.keywords):
            value = value.args[0]
        if isinstance(node.target, ast.Name) and node.target.id == TRUST and not _is_const(value, False):
            self.flag(node, f"field {TRUST} must default to False")
        self.generic_visit(node)

    def visit_Assign(self, node):
        for target in node.targets:
            if isinstance(target, ast.Attribute) and target.attr == TRUST:
                self.flag(node, f"assigns {TRUST} to an attribute (only the explicit flag may set it)")
        self.generic_visit(node)

    # ----------------------------------------------------------------- reads of trust_remote_code out of data

    def visit_Subscript(self, node):
        if _is_const_str(node.slice, TRUST):
            self.flag(node, f"reads {TRUST} out of a mapping (a manifest or YAML file must not enable it)")
        self.generic_visit(node)

    def visit_Attribute(self, node):
        name = self.dotted(node)
        if name and name.startswith("yaml.") and name.split(".", 1)[1] in UNSAFE_YAML:
            self.flag(node, f"uses {name} (only yaml.safe_load)")
        self.generic_visit(node)

    # ----------------------------------------------------------------- calls

    def visit_Call(self, node):
        name = self.dotted(node.func) or ""
        keywords = {k.arg: k.value for k in node.keywords if k.arg}
        if name in ("torch.load", "torch.serialization.load") and not _is_const(keywords.get("weights_only"), True):
            self.flag(node, f"{name} without weights_only=True")
        if name in ("numpy.load", "numpy.lib.npyio.load") and "allow_pickle" in keywords \
                and not _is_const(keywords["allow_pickle"], False):
            self.flag(node, f"{name} with allow_pickle")
        if name in ALWAYS_SHELL:
            self.flag(node, f"{name} runs a shell")
        if (name in SUBPROCESS_CALLS or name.startswith("asyncio.create_subprocess")) and "shell" in keywords \
                and not _is_const(keywords["shell"], False):
            self.flag(node, f"{name} with shell=")
        if isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec") and node.func.id not in self.aliases:
            self.flag(node, f"calls {node.func.id}()")
        if TRUST in keywords and not self._explicit_trust(keywords[TRUST]):
            self.flag(node, f"passes {TRUST}={ast.unparse(keywords[TRUST])} (only False, the parameter, or "
                            f"cfg.{TRUST})")
        if isinstance(node.func, ast.Attribute) and node.func.attr in ("get", "pop", "setdefault") and node.args \
                and _is_const_str(node.args[0], TRUST):
            self.flag(node, f"reads {TRUST} out of a mapping with .{node.func.attr}()")
        if name in ("getattr", "setattr") and len(node.args) > 1 and _is_const_str(node.args[1], TRUST):
            self.flag(node, f"{name}(..., '{TRUST}')")
        self.generic_visit(node)

    def _explicit_trust(self, value) -> bool:
        if _is_const(value, False):
            return True
        if isinstance(value, ast.Name):
            return value.id == TRUST and TRUST in self.params[-1]
        return (isinstance(value, ast.Attribute) and value.attr == TRUST and isinstance(value.value, ast.Name)
                and value.value.id in CONFIG_NAMES)


def _is_const_str(node, text: str) -> bool:
    return isinstance(node, ast.Constant) and node.value == text


def audit_source(source: str, label: str = "<snippet>") -> list[str]:
    audit = Audit(label)
    audit.visit(ast.parse(source))
    return audit.violations


def test_the_source_tree_keeps_the_security_rules():
    assert len(SCANNED) >= 50          # the package and bench/ are really there
    violations = [v for path in SCANNED for v in audit_source(path.read_text(encoding="utf-8"),
                                                               str(path.relative_to(ROOT)))]
    assert violations == []


@pytest.mark.parametrize("snippet, rule", [
    ("import pickle", "pickle"),
    ("import cloudpickle as cp", "pickle"),
    ("from joblib import load", "pickle"),
    ("import torch\ntorch.load('x.pt')", "weights_only"),
    ("import torch\ntorch.load('x.pt', weights_only=False)", "weights_only"),
    ("from torch import load as tl\ntl('x.pt')", "weights_only"),
    ("import numpy as np\nnp.load('x.npy', allow_pickle=True)", "allow_pickle"),
    ("import yaml\nyaml.load(open('c.yaml'))", "yaml.load"),
    ("import yaml\nyaml.safe_load(s, Loader=yaml.Loader)", "yaml.Loader"),
    ("from yaml import unsafe_load", "yaml.unsafe_load"),
    ("import yaml\nyaml.full_load(s)", "yaml.full_load"),
    ("import subprocess\nsubprocess.run('ls', shell=True)", "shell="),
    ("import subprocess as sp\nsp.Popen(cmd, shell=flag)", "shell="),
    ("import os\nos.system('ls')", "os.system"),
    ("eval('1 + 1')", "eval"),
    ("m.from_pretrained(p, trust_remote_code=True)", TRUST),
    ("m.from_pretrained(p, trust_remote_code=manifest['trust_remote_code'])", TRUST),
    ("m.from_pretrained(p, trust_remote_code=settings.get('trust_remote_code', False))", TRUST),
    ("def f(trust_remote_code=False):\n    m.from_pretrained(p, trust_remote_code=trust_remote_code)", None),
    ("trust_remote_code: bool = runtime(True)", TRUST),
    ("trust_remote_code: bool = runtime(False)", None),
    ("def g():\n    m.from_pretrained(p, trust_remote_code=trust_remote_code)", TRUST),   # not a parameter here
    ("def f(trust_remote_code=True):\n    pass", TRUST),
    ("class C:\n    trust_remote_code: bool = True", TRUST),
    ("cfg.trust_remote_code = manifest['x']", TRUST),
    ("x = getattr(run_config, 'trust_remote_code')", TRUST),
    ("m.from_pretrained(p, trust_remote_code=cfg.trust_remote_code)", None),
    ("import numpy as np\nnp.load('x.npz')", None),
    ("import torch\ntorch.load('x.pt', weights_only=True)", None),
    ("import subprocess\nsubprocess.run(['ls'], check=True)", None),
])
def test_the_audit_catches_each_rule(snippet, rule):
    violations = audit_source(snippet)
    if rule is None:
        assert violations == []
    else:
        assert len(violations) >= 1 and any(rule in v for v in violations), violations


# ======================================================================== paths built from data stay inside

HOSTILE_IDS = ["../../x", "/etc/passwd", "a/b", "..", "C:\\x", "~/.ssh/id_hostile"]


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_names_from_data_become_one_path_component():
    from cot2align.config import data_name, model_family
    from cot2align.eval.evaluate import default_eval_dir

    for text in HOSTILE_IDS + ["", ".", "../..", "a/../../b.jsonl", "x\x00y", "../" * 50]:
        for name in (model_family(text), data_name(text)):
            assert name and "/" not in name and "\\" not in name and not name.startswith("."), (text, name)
        where = default_eval_dir("runs/m", text, "test")
        assert where.parent == Path("runs/m/eval") and where.name.endswith("_test")


def test_a_remote_listing_cannot_write_outside_the_copy(tmp_path):
    """A remote cache's teacher files are copied locally by object name; S3 allows keys such as a/../../x."""
    from cot2align.cache import CacheError
    from cot2align.cache.storage import Location, contained

    assert contained(tmp_path, "sub/tokenizer.json", "s3://b/c") == tmp_path / "sub" / "tokenizer.json"
    for name in ("../x", "a/../../x", "/etc/passwd", "a//b", "./x", ""):
        with pytest.raises(CacheError, match="refusing the object name"):
            contained(tmp_path, name, "s3://b/c")
    location = Location("memory://hostile-cache")
    location.fs.pipe("/hostile-cache/teacher/tokenizer.json", b"{}")
    real_find = location.fs.find
    location.fs.find = lambda path: real_find(path) + [f"{path}/../../escaped.txt"]   # what a hostile listing says
    with pytest.raises(CacheError, match=r"refusing the object name '\.\./\.\./escaped\.txt'"):
        location.local_copy("teacher", tmp_path / "copy" / "teacher")
    assert not any("escaped" in f for f in _files(tmp_path))


@pytest.mark.parametrize("pointer", ["../../elsewhere", "/etc", "step-1/../../x", "latest"])
def test_the_checkpoint_pointer_names_only_a_checkpoint(tmp_path, pointer):
    from cot2align.train import TrainingError
    from cot2align.train.checkpoint import latest_checkpoint

    (tmp_path / "checkpoints" / "step-00000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-00000002" / "state.json").write_text("{}")
    (tmp_path / "checkpoints" / "latest").write_text("step-00000002\n")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-00000002"
    (tmp_path / "checkpoints" / "latest").write_text(pointer)
    with pytest.raises(TrainingError, match="expected the name of a step-<N> checkpoint"):
        latest_checkpoint(tmp_path)


def test_report_labels_runs_but_writes_only_its_two_files(tmp_path):
    from cot2align.config import ConfigError
    from cot2align.eval import report

    runs = tmp_path / "runs"
    for name, data in (("..evil", "../../etc/passwd"), ("a b", "/abs/olute.jsonl")):
        (runs / name / "eval" / "x").mkdir(parents=True)
        (runs / name / "eval" / "x" / "results.json").write_text(json.dumps({"data": data, "mean": 1.0, "std": 0.0}))
    before = _files(tmp_path)
    markdown = report(str(runs), log=lambda m: None)
    assert "passwd" in markdown and "olute" in markdown
    assert _files(tmp_path) - before <= {"runs/report.md", "runs/report.png"}
    (runs / "a b" / "run.json").write_text("{broken")
    with pytest.raises(ConfigError, match=r"run\.json: not a readable run marker"):
        report(str(runs), log=lambda m: None)
    (runs / "a b" / "run.json").write_text(json.dumps({"config": {"method": "sft"}}))
    (runs / "a b" / "eval" / "x" / "results.json").write_text(json.dumps({"data": "d", "mean": "high"}))
    with pytest.raises(ConfigError, match=r"field 'mean' must be a number, got str"):
        report(str(runs), log=lambda m: None)


def test_a_manifest_naming_a_path_as_its_dataset_is_never_read_as_one(tmp_path, monkeypatch):
    """Validation loads the dev split of the cache's dataset only when the manifest names a known alias; a
    manifest saying ../../etc/passwd (or any path) falls back to held-out cached examples."""
    from cot2align.config import DistillConfig
    from cot2align.train import validation

    class Cache:
        manifest = {"data": {"name": None}}

        def texts(self):
            return {"prompt_std": ["p0", "p1"], "response_std": ["r0", "r1"]}

    opened = []
    monkeypatch.setattr(validation, "load_records", lambda source, *a, **k: opened.append(source) or ([], {}))
    for name in ("../../etc/passwd", "/etc/passwd", "a/b.jsonl", "..", str(tmp_path)):
        Cache.manifest["data"]["name"] = name
        records = validation.validation_records(DistillConfig(cache="c"), Cache(), [1])
        assert records == [{"prompt": "p1", "references": ["r1"]}]
    assert opened == []


@pytest.mark.slow
def test_hostile_ids_and_a_poisoned_manifest_stay_inside_and_never_enable_remote_code(tmp_path, monkeypatch):
    """Records whose ids look like paths go through augment-cot, the teacher cache and two distill runs (the second
    a --resume); the cache's manifest then claims trust_remote_code and names its teacher, tokenizer and data
    with '..' paths, a config.yaml inside the cache and the run's own config.yaml say trust_remote_code: true.
    Nothing is written outside the working directory, no file is named after an id, and every model or
    tokenizer load gets trust_remote_code=False."""
    import transformers

    from cot2align.config import CacheTeacherConfig, DistillConfig, build_config
    from cot2align.data import augment as augment_module
    from cot2align.data.augment import AugmentConfig, augment_cot
    from cot2align.teacher.cache_pass import cache_teacher
    from cot2align.train.distill import distill

    trust_seen = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM, transformers.AutoConfig):
        original = cls.from_pretrained

        def spy(*args, _original=original, **kwargs):
            trust_seen.append(kwargs.get("trust_remote_code", False))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    work = tmp_path / "a" / "b" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps({"id": i, "instruction": f"Say {n}.", "output": f"{n} is said.",
                                        "rationale": "Because."}) + "\n" for n, i in enumerate(HOSTILE_IDS)))
    monkeypatch.setattr(augment_module, "_generate_hf", lambda m, t, prompts, cfg, seed: [("Think.", False)] * len(prompts))
    augment_cot(AugmentConfig(model="tiny-gpt2", data=str(data), out="cot.jsonl"), log=lambda m: None)
    assert sorted(json.loads(line)["id"] for line in Path("cot.jsonl").read_text().splitlines()) == sorted(HOSTILE_IDS)
    cache_teacher(build_config(CacheTeacherConfig, model="tiny-qwen2", data="cot.jsonl", topk=4, max_length=256,
                               max_prompt_length=128, batch_tokens=1024), log=lambda m: None)
    cache = next(Path("cache").iterdir())
    manifest_file = cache / "zarr.json"
    group = json.loads(manifest_file.read_text())
    group["attributes"]["trust_remote_code"] = True
    group["attributes"]["settings"]["trust_remote_code"] = True
    group["attributes"]["teacher"]["name_or_path"] = "../../../evil-teacher"
    group["attributes"]["tokenizer"]["name_or_path"] = "../../../evil-tokenizer"
    group["attributes"]["data"]["name"] = "../../../../etc/passwd"
    # re-sealed with a valid checksum: the attacker who can write the manifest can also recompute it, so what is
    # tested here is that no manifest value is ever trusted as a path or a permission
    from cot2align.cache.format import with_checksum

    group["attributes"] = with_checksum(group["attributes"])
    manifest_file.write_text(json.dumps(group))
    for where in (cache, cache / "teacher"):
        (where / "config.yaml").write_text("trust_remote_code: true\n")
    common = dict(cache=str(cache), student="tiny-gpt2", method="dskd", epochs=1, batch_size=2, val_examples=2,
                  val_max_new_tokens=4, max_length=256)
    distill(build_config(DistillConfig, max_steps=1, out="run", **common), log=lambda m: None, progress=False)
    (work / "run" / "config.yaml").write_text((work / "run" / "config.yaml").read_text()
                                              .replace("trust_remote_code: false", "trust_remote_code: true"))
    marker = json.loads((work / "run" / "run.json").read_text())
    marker["config"]["trust_remote_code"] = True
    (work / "run" / "run.json").write_text(json.dumps(marker))
    (work / "run" / "summary.json").unlink()      # as if killed before its end: --resume loads the run again
    resumed = build_config(DistillConfig, max_steps=1, out="run", resume=True, **common)
    distill(resumed, log=lambda m: None, progress=False)
    assert resumed.trust_remote_code is False and trust_seen and not any(trust_seen)
    outside = {f for f in _files(tmp_path) if not f.startswith("a/b/work")}
    assert outside == {"a", "a/b"}
    data_names = ("x", "passwd", "id_hostile", "evil-teacher", "evil-tokenizer")
    named_after_data = [f for f in _files(work) if Path(f).name in data_names]
    assert named_after_data == []
