"""A newcomer's first hour: the README's commands as written, argument errors, the demo's own output, --help."""

import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import BMMC, run

from models.presets import DEMO_LABELS
from pipeline.analysis.heldout import cell_type_table
from pipeline.atlas.labels import term_names
from pipeline.cli import predict_argument_problem
from pipeline.plan.datasets import plan_dataset
from pipeline.run.cpu import fast_fp32_matmul, fp32_matmul_precision

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def new_shell(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """``command`` in a fresh bash that has only the system's PATH, as in a new terminal without activation."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), "OMP_NUM_THREADS": "2"}
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def install_folder(tmp_path: Path) -> Path:
    """A folder laid out like the one the README installs into: ``.venv`` is this test run's environment."""
    folder = tmp_path / "clone"
    folder.mkdir()
    (folder / ".venv").symlink_to(sys.prefix)
    return folder


#: Commands of the README that run on a SLURM cluster's login node, not in a newcomer's shell (tests/test_slurm*.py).
CLUSTER_COMMANDS = ("sbatch", "srun", "scontrol", "squeue", "sacct")


def readme_commands() -> list[str]:
    """Every command line of the README's bash blocks (continued lines joined), comments removed."""
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def program_of(step: str) -> str:
    """The program a shell step runs: its first word after any ``NAME=value`` assignments."""
    words = shlex.split(step)
    return next(word for word in words if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", word))


def test_every_readme_command_starts_with_something_a_new_shell_finds(tmp_path):
    folder = install_folder(tmp_path)
    commands = readme_commands()
    assert sum(c.startswith(".venv/bin/scatlas ") for c in commands) >= 8
    for command in commands:
        for step in re.split(r"\s*&&\s*", command):
            if any(re.search(rf"(^|[\s(]){c}\b", step) for c in CLUSTER_COMMANDS):
                continue  # run on a cluster's login node
            program = program_of(step)
            found = (folder / program).exists() if "/" in program else new_shell(f"command -v {program}", folder)
            assert found if isinstance(found, bool) else found.returncode == 0, f"{program!r} of: {command}"
    for command in [c for c in commands if c.endswith("--help")]:
        proc = new_shell(command, folder)
        assert proc.returncode == 0 and "scatlas predict" in proc.stdout, (command, proc.stderr[-2000:])


def test_the_demo_speaks_to_users_its_hint_runs_as_printed_and_a_rerun_says_it_is_complete(tmp_path):
    folder = install_folder(tmp_path)
    demo = re.search(r"&& (\.venv/bin/scatlas predict)\n", README).group(1)  # the first command's last step
    first = new_shell(demo, folder)
    assert first.returncode == 0, first.stderr[-3000:]
    output = first.stdout + first.stderr
    assert "fp32 matmuls" not in output and "small gene panel" not in output and "WARNING" not in output
    if shutil.which("srun") and "SLURM_JOB_ID" not in os.environ:  # SLURM installed, this is no job of it
        assert "srun" not in output  # Lightning's hint to use srun is not for a laptop or a login node
    hint = first.stdout.splitlines()[-2:]
    assert hint == ["read it:  .venv/bin/scatlas status atlas", "          .venv/bin/scatlas validate atlas"]
    for line in hint:
        command = line.removeprefix("read it:").strip()
        assert new_shell(command, folder).returncode == 0, command
    again = new_shell(demo, folder)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.splitlines() == ["atlas atlas is complete, nothing to do: 600 cells embedded (run 0, 1 units)"]
    assert "DataLoader" not in again.stderr
    plot = new_shell(".venv/bin/scatlas plot atlas --cells 200", folder)
    assert plot.returncode == 0, plot.stderr[-3000:]
    assert plot.stdout.split() == ["atlas/plots/embedding_pca.png", "atlas/plots/score_histograms.png"]
    assert (
        "cell_type_by_organism.png: not plotted, every cell has the same top-1 organism (Homo sapiens)" in plot.stderr
    )
    summary = new_shell(".venv/bin/scatlas summarize atlas", folder).stdout
    assert "CD14-positive monocyte" in summary and "Homo sapiens 100%" in summary and "CL:" not in summary


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["inptu=x.h5ad"], "no key 'inptu' in the config (did you mean 'input'?)"),
        (["data.countz=X"], "no key 'data.countz' in the config (did you mean 'data.counts'?)"),
        (
            ["model=tinyy"],
            "model=tinyy: no such model (did you mean 'tiny'?) (the options: large, medium, small, tiny)",
        ),
        (["trainer=default"], "trainer=default: no such trainer"),
        (["input=/data/a,b.h5ad"], """'input="/data/a,b.h5ad"'"""),
        (["input=x(1).h5ad"], """'input="x(1).h5ad"'"""),
        (["seed=1.5"], "seed=1.5: must be a whole number (default 0)"),
        (["model=medium", "model.max_len=2k"], "model.max_len=2k: must be a whole number (default 2000)"),
        (["input=/no/such/file.h5ad"], "input /no/such/file.h5ad does not exist"),
        (["input=/no/such/*.h5ad"], "input pattern /no/such/*.h5ad matches no file"),
    ],
)
def test_an_argument_error_is_one_line_naming_the_key_and_the_remedy(argv, expected):
    problem = predict_argument_problem(argv)
    assert expected in problem and "\n" not in problem


def test_arguments_that_are_right_pass_the_check():
    assert predict_argument_problem([]) is None
    assert predict_argument_problem([f"input=[{BMMC},/no/such/file.h5ad]", "trainer=gpu", "hydra.verbose=true"]) is None
    assert (
        predict_argument_problem(["trainer=ddp", "trainer.devices=auto", "data.min_gene_coverage=0", "seed=7"]) is None
    )


def test_an_argument_error_exits_2_before_anything_is_created_and_usage_names_scatlas_predict(tmp_path):
    proc = run([sys.executable, "-m", "pipeline", "predict", "inptu=x.h5ad", f"out_dir={tmp_path / 'atlas'}"])
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("scatlas predict: error: no key 'inptu'")
    missing = run([sys.executable, "-m", "pipeline", "predict", "input=missing.h5ad"], cwd=tmp_path)
    assert missing.returncode == 2 and "input missing.h5ad does not exist" in missing.stderr
    flag = run([sys.executable, "-m", "pipeline", "predict", "--input", "x.h5ad"], cwd=tmp_path)
    assert flag.returncode == 2 and "usage: scatlas predict" in flag.stderr and "__main__" not in flag.stderr
    assert list(tmp_path.iterdir()) == []


def test_predict_help_and_the_readme_give_the_same_groups_and_defaults():
    help_text = run([sys.executable, "-m", "pipeline", "predict", "--help"]).stdout
    groups = dict(re.findall(r"^(\w+): (.+)$", help_text.split("== Configuration groups ==")[1].split("==")[0], re.M))
    group_table = README.split("| group | options |")[1].split("\n\n")[0]
    readme_groups = dict(re.findall(r"^\| `(\w+)` \| (`.+`) \|$", group_table, re.M))
    assert {g: sorted(o.split(", ")) for g, o in groups.items()} == {
        g: sorted(o.replace("`", "").split(", ")) for g, o in readme_groups.items()
    }
    config = yaml.safe_load(help_text.split("== Config ==")[1].split("Powered by Hydra")[0].split("\n", 2)[2])
    rows = re.findall(r"^\| (`[\w.]+`(?:, `[\w.]+`)*) \| (`[^|]*`) \|", README, re.M)
    assert len(rows) >= 15
    documented = set()
    for keys, defaults in rows:
        for key, default in zip(keys.replace("`", "").split(", "), defaults.replace("`", "").split(", ")):
            value = config
            for part in key.split("."):
                value = value[part] if isinstance(value, dict) else None
            if isinstance(value, dict):  # a group: its default option
                value = re.search(rf"^  - {key}: (\w+)$", (REPO / "configs" / "predict.yaml").read_text(), re.M)[1]
            assert str(yaml.safe_load(default)) == str(value), key
            documented.add(key)
    plain = [k for k, v in config.items() if not isinstance(v, dict)]
    data = [f"data.{k}" for k, v in config["data"].items() if not str(v).startswith(("${", "pipeline."))]
    assert set(plain + data) <= documented


def test_label_names_ship_with_the_package_and_are_the_ontology_names():
    code = "import sys; from pipeline.atlas.labels import term_names; print(term_names(['CL:0001054', 'NCBITaxon:10090'])); print('cellxgene_ontology_guide' in sys.modules)"  # fmt: skip
    proc = run([sys.executable, "-c", code])
    assert proc.stdout.splitlines() == [
        "{'CL:0001054': 'CD14-positive monocyte', 'NCBITaxon:10090': 'Mus musculus'}",
        "False",
    ]
    from cellxgene_ontology_guide.ontology_parser import OntologyParser

    parser = OntologyParser()
    terms = [t for t in {*cell_type_table().term, *(t for v in DEMO_LABELS.values() for t in v)} if ":" in t]
    names = term_names(terms)
    assert len(terms) > 60
    assert {t: names[t] for t in terms} == {t: parser.get_term_label(t) for t in terms}
    assert term_names(["CD8+ T naive doublet", "unknown"]) == {"CD8+ T naive doublet": "CD8+ T naive doublet",
                                                             "unknown": "unknown"}  # fmt: skip


def test_a_panel_smaller_than_the_tokens_a_cell_shows_is_warned_about_and_the_demo_panel_is_not():
    from models.presets import preset_config

    genes = preset_config("tiny").genes
    settings = {"counts": "auto", "organism": None, "min_gene_coverage": 0.002}
    demo = plan_dataset(0, str(BMMC), genes, {**settings, "max_len": 256})
    published = plan_dataset(0, str(BMMC), genes, {**settings, "max_len": 2000})
    assert demo.status == published.status == "pending"  # planned, not failed
    assert demo.warnings == [] and demo.n_vocab_genes == 955
    assert published.warnings[0].startswith("small gene panel: 955 vocabulary genes, fewer than the 2000 gene tokens")


def test_the_fp32_matmul_probe_reports_at_debug_level_only(caplog):
    import torch

    previous = fp32_matmul_precision()
    try:
        with caplog.at_level(logging.INFO, logger="pipeline.run.cpu"):
            fast_fp32_matmul(32, 4, 256)
        assert not caplog.records
        with caplog.at_level(logging.DEBUG, logger="pipeline.run.cpu"):
            fast_fp32_matmul(32, 4, 256)
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = previous
    assert [r.levelno for r in caplog.records] == [logging.DEBUG] and "fp32 matmuls" in caplog.records[0].message
