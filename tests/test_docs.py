"""README.md and docs/*.md say only what is true: every link, path and module they cite exists, every
`python train.py|attribute.py|evaluate.py ...` command composes with Hydra, every script they name exists and answers
--help. The README stays the short front door."""
from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT, compose

README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 300
ENTRY_CONFIGS = {"train.py": "train", "attribute.py": "attribute", "evaluate.py": "evaluate"}
CHECKED_ROOTS = ("src", "conf", "scripts", "results", "benchmarks", "tests", "docs")


@dataclass(frozen=True)
class Snippet:
    """A piece of a markdown file: `fenced` code, an `inline` code span, or a `prose` line; `line` is 1-based.
    `lang` is a fenced block's info string (bash, python, yaml, text, ...)."""
    file: Path
    line: int
    kind: str
    text: str
    lang: str = ""

    @property
    def where(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line}"


def snippets(path: Path) -> list[Snippet]:
    """Fenced blocks as logical lines (backslash continuations joined), inline code spans, and the prose lines."""
    out, fence, pending, pending_line = [], None, "", 0
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.lstrip().startswith("```"):
            if pending:  # a continuation left open at the block's end is still a command
                out.append(Snippet(path, pending_line, "fenced", pending, fence.strip().strip("`").strip()))
                pending = ""
            fence = None if fence else line
            continue
        if fence:
            if not pending:
                pending_line = number
            pending += line
            if line.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            out.append(Snippet(path, pending_line, "fenced", pending, fence.strip().strip("`").strip()))
            pending = ""
            continue
        if line.startswith("|"):  # a table cell's escaped pipe is a plain one inside its code spans
            line = line.replace("\\|", "|")
        out.append(Snippet(path, number, "prose", line))
        out += [Snippet(path, number, "inline", span) for span in re.findall(r"`([^`]+)`", line)]
    assert fence is None, f"{path.relative_to(ROOT)}: a code fence is never closed"
    return out


ALL = [s for doc in DOCS for s in snippets(doc)]


# ---------------------------------------------------------------- (1) links, paths and modules exist

def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but - and _ dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@functools.cache
def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_fence = False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        elif not in_fence and (m := re.match(r"#{1,6}\s+(.*)", line)):
            base = github_slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_every_relative_link_resolves():
    broken = []
    for s in (s for s in ALL if s.kind == "prose"):
        for target in LINK.findall(s.text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not checked offline
            file_part, _, anchor = target.partition("#")
            dest = (s.file.parent / file_part).resolve() if file_part else s.file
            if not dest.exists():
                broken.append(f"{s.where}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{s.where}: {target} (no heading with anchor #{anchor} in {dest.name})")
    assert not broken, "broken links:\n" + "\n".join(broken)


PATH = re.compile(r"(?<![\w/.$<-])((?:%s)/[\w.*{},/<>|-]*[\w*}>/])" % "|".join(CHECKED_ROOTS))


def expand_braces(text: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", text)
    if not m:
        return [text]
    return [x for alt in m.group(1).split(",") for x in expand_braces(text[:m.start()] + alt + text[m.end():])]


def path_exists(cited: str) -> bool:
    if "<" in cited:  # a placeholder (<name>, test_<name>.py) stands for any name: its folder must exist
        cited = cited[:cited.split("<")[0].rfind("/") + 1]
    if "*" in cited:
        return any(ROOT.glob(cited.rstrip("/")))
    return (ROOT / cited).exists()


PACKAGE_FOLDERS = sorted(p.name for p in (ROOT / "src" / "safety_units").iterdir() if (p / "__init__.py").is_file())
PACKAGE_FILE = re.compile(r"(?<![\w/.$<-])((?:%s)/[\w/]*\.py)\b" % "|".join(PACKAGE_FOLDERS))


def test_every_cited_path_exists():
    """Paths in prose and in inline code (not in fenced blocks, where --out arguments name paths to be written):
    from the repo root (src/..., results/...), or a package module by its folder (attribution/scorer.py)."""
    missing = []
    for s in (s for s in ALL if s.kind == "prose"):  # a prose line holds its inline code spans
        text = LINK.sub("]", s.text)  # link targets: checked above
        for cited in PATH.findall(text):
            missing += [f"{s.where}: {p}" for p in expand_braces(cited) if not path_exists(p)]
        missing += [f"{s.where}: {p}" for p in PACKAGE_FILE.findall(text)
                    if not (ROOT / "src" / "safety_units" / p).is_file()]
    assert not missing, "cited paths that do not exist:\n" + "\n".join(missing)


PACKAGE = ROOT / "src" / "safety_units"


def defines(source: Path, name: str) -> bool:
    text = source.read_text()
    return bool(re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{name}\b|^{name}\s*[:=]|\bimport\b[^\n]*\b{name}\b",
                          text, re.M))


# A fenced example that starts with `# src/safety_units/<x>.py` shows a module being added (Adding a scorer): its
# names are the example's, not the package's.
EXAMPLE_MODULES = {m for s in ALL if s.kind == "fenced"
                   for m in re.findall(r"^# (src/safety_units/[\w/]+\.py)", s.text)}


def module_problem(dotted: str) -> str | None:
    """None when safety_units.a.b[.attr[.attr]] names a package folder, a module or a name one of them defines."""
    path, parts = PACKAGE, dotted.split(".")[1:]
    while parts and (path / parts[0]).is_dir():
        path = path / parts.pop(0)
    if parts and (path / f"{parts[0]}.py").relative_to(ROOT).as_posix() in EXAMPLE_MODULES:
        return None
    if parts and (path / f"{parts[0]}.py").is_file():
        path = path / f"{parts.pop(0)}.py"
    if not parts:
        return None
    source = path if path.suffix == ".py" else path / "__init__.py"
    missing = [p for p in parts if not (source.is_file() and defines(source, p))]
    return f"{'.'.join(parts)} not found in {source.relative_to(ROOT)}" if missing else None


def test_every_cited_module_exists():
    """Dotted names (safety_units.x.y.name) anywhere, and the names a code example imports from the package."""
    wrong = []
    for s in ALL:
        cited = re.findall(r"(?<![\w/.])safety_units(?:\.\w+)+", s.text)
        for module, names in re.findall(r"from\s+(safety_units[\w.]*)\s+import\s+\(?([\w, ]+)", s.text):
            cited += [f"{module}.{name.split()[0]}" for name in names.split(",") if name.strip()]  # a as b: a
        for dotted in cited:
            if (problem := module_problem(dotted)) is not None:
                wrong.append(f"{s.where}: {dotted}: {problem}")
    assert not wrong, "cited modules or names that do not exist:\n" + "\n".join(sorted(set(wrong)))


# ---------------------------------------------------------------- (2) entry-point commands compose

SHELL_FENCES = ("", "bash", "sh", "shell", "console")


def entry_commands() -> list[tuple[Snippet, list[str]]]:
    """(snippet, tokens from the entry point's script name on) of every train/attribute/evaluate.py command: in
    shell code blocks (```bash, or no language) and in inline code that starts with `python <entry point>`."""
    found = []
    for s in ALL:
        text = s.text
        if s.kind == "inline" and not re.match(r"python\s+(train|attribute|evaluate)\.py\b", text):
            continue
        if s.kind == "fenced" and (s.lang not in SHELL_FENCES
                                   or not re.search(r"\b(train|attribute|evaluate)\.py\b", text)):
            continue
        if s.kind == "prose":
            continue
        # shell level: placeholders (<aligned>, <map dir>) and $VARIABLES stand for one word each
        text = re.sub(r"<[^<>]*>", "PLACEHOLDER", text)
        text = re.sub(r"\$\{?(\w+)\}?", r"\1", text)
        try:
            tokens = shlex.split(text, comments=True)
        except ValueError as e:
            found.append((s, [f"<unparseable: {e}>"]))
            continue
        while tokens and re.fullmatch(r"\w+=.*", tokens[0]):
            tokens = tokens[1:]  # VAR=value before the command
        named = [i for i, t in enumerate(tokens) if t in ENTRY_CONFIGS]
        if named and tokens[0] in ("python", "torchrun", "srun"):
            found.append((s, tokens[named[0]:]))
        elif named:  # never skipped silently: a line naming an entry point that is not a command fails
            found.append((s, ["<unparseable: not a python/torchrun/srun command>"]))
    return found


ENTRY_COMMANDS = entry_commands()
FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-dir", "-cd"}
FLAGS_ALONE = {"--help", "-h", "--hydra-help", "--resolve", "--info", "-i"}


def overrides_of(tokens: list[str]) -> tuple[str, list[str], bool]:
    """(config name, overrides, multirun) from `train.py [flags] overrides ...`; an unknown flag is an error."""
    config, rest, multirun, overrides = ENTRY_CONFIGS[tokens[0]], iter(tokens[1:]), False, []
    for tok in rest:
        if tok in ("-m", "--multirun"):
            multirun = True
        elif tok in FLAGS_WITH_VALUE:
            next(rest, None)
        elif tok in FLAGS_ALONE or tok in ("...", "[...]") or re.fullmatch(r"\[[^=\]]*\]", tok):
            continue  # meta: [overrides], "..." (more of the same)
        elif tok.startswith("-"):
            raise ValueError(f"unknown flag {tok}")
        elif re.fullmatch(r"\[[^\[\]]+=.*\]", tok):
            overrides.append(tok[1:-1])  # an optional override, [judge=ensemble]: compose it too
        else:
            overrides.append(tok)
    return config, overrides, multirun


def expand_sweeps(overrides: list[str]) -> list[list[str]]:
    """A multirun's jobs: enough of them that every option of a swept config group composes once (a swept plain
    value, seed=1,2, composes with its first value: the values are untyped)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    values = [list(o.sweep_string_iterator()) if o.is_sweep_override() else None for o in parsed]
    values = [v if v is None or (ROOT / "conf" / o.key_or_group).is_dir() else v[:1] for o, v in zip(parsed, values)]
    n = max((len(v) for v in values if v), default=1)
    return [[f"{o.get_key_element()}={v[i % len(v)]}" if v else o.input_line for o, v in zip(parsed, values)]
            for i in range(n)]


def test_docs_name_entry_point_commands():
    assert len(ENTRY_COMMANDS) >= 40, f"only {len(ENTRY_COMMANDS)} commands found: the extraction is broken"


COMPOSED: set[tuple[str, tuple[str, ...]]] = set()  # a command the README and a docs page both show composes once


@pytest.mark.parametrize("snippet,tokens", ENTRY_COMMANDS, ids=[s.where for s, _ in ENTRY_COMMANDS])
def test_documented_command_composes(snippet, tokens, tmp_path):
    from omegaconf import OmegaConf

    command = " ".join(tokens)
    assert not tokens[0].startswith("<unparseable"), f"{snippet.where}: {snippet.text}: {tokens[0]}"
    try:
        config, overrides, multirun = overrides_of(tokens)
        jobs = expand_sweeps(overrides) if multirun else [overrides]
        for job in jobs:
            if (config, tuple(job)) not in COMPOSED:
                OmegaConf.resolve(compose(config, job, output_dir=tmp_path))
                COMPOSED.add((config, tuple(job)))
    except Exception as e:  # noqa: BLE001 -- any failure is the documented command's, reported with its place
        pytest.fail(f"{snippet.where}: `{command}` does not compose: {type(e).__name__}: {e}")


# ---------------------------------------------------------------- (3) scripts exist and answer --help

def named_scripts() -> dict[str, str]:
    """script path -> where it is first named, for `python scripts|benchmarks/x.py` and `bash scripts|tests/x.sh`."""
    named = {}
    for s in ALL:
        for cited in re.findall(r"python\s+((?:scripts|benchmarks)/[\w{},]+\.py)", s.text):
            for path in expand_braces(cited):
                named.setdefault(path, s.where)
        for path in re.findall(r"bash\s+((?:scripts|tests)/[\w/]+\.sh)", s.text):
            named.setdefault(path, s.where)
    return named


NAMED_SCRIPTS = named_scripts()

HELP_BATCH = """
import contextlib, io, runpy, sys
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(path, run_name="__main__")
        print(f"{path}: --help did not exit")
    except SystemExit as e:
        if e.code not in (0, None) or "usage" not in out.getvalue():
            print(f"{path}: --help exited {e.code} with {out.getvalue()[-300:]!r}")
    except BaseException as e:
        print(f"{path}: {type(e).__name__}: {e}")
"""


def test_named_scripts_exist():
    missing = [f"{where}: {path}" for path, where in NAMED_SCRIPTS.items() if not (ROOT / path).is_file()]
    assert not missing, "scripts named in the docs that do not exist:\n" + "\n".join(missing)
    assert "scripts/run_study.py" in NAMED_SCRIPTS, "the extraction is broken"


def test_named_scripts_answer_help():
    """One interpreter for all of scripts/ (imports are shared): each prints its usage and exits 0. Benchmarks are
    only checked to exist (their imports, torch and the study's runner, would cost seconds here)."""
    scripts = sorted(p for p in NAMED_SCRIPTS if re.fullmatch(r"scripts/\w+\.py", p) and (ROOT / p).is_file())
    run = subprocess.run([sys.executable, "-c", HELP_BATCH, *scripts], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and not run.stdout.strip(), run.stdout + run.stderr[-2000:]


def test_readme_entry_points_name_every_script():
    text = README.read_text()
    scripts = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "scripts").iterdir() if p.suffix in (".py", ".sh"))
    missing = [p for p in scripts if p not in text]
    assert not missing, f"README.md's entry points do not name: {missing}"


# ---------------------------------------------------------------- the front door

def test_readme_is_short_and_links_every_docs_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"
    linked = {(ROOT / t.partition("#")[0]).resolve() for line in lines for t in LINK.findall(line)}
    orphans = [p.name for p in DOCS[1:] if p.resolve() not in linked]
    assert not orphans, f"docs pages README.md does not link: {orphans}"


def test_readme_layout_names_every_package_folder():
    """The Layout block lists the package's folders one per line (indented under src/safety_units/): no more, no
    fewer, so that a folder added or renamed shows up here."""
    text = README.read_text()
    block = re.search(r"^## Layout\n.*?^```text\n(.*?)^```", text, re.M | re.S)
    assert block, "README.md has no ```text block under ## Layout"
    listed = set(re.findall(r"^  (\w+)/", block.group(1), re.M))
    package = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert listed == package, (f"Layout lists {sorted(listed - package)}, which do not exist, and misses "
                               f"{sorted(package - listed)}")
    top = set(re.findall(r"^(\w+)/", block.group(1), re.M))
    assert all((ROOT / d).is_dir() for d in top), f"Layout names a missing top-level folder: {sorted(top)}"
