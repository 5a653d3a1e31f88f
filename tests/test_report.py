"""`clusmar report`: one offline HTML page for a real simulation and a real round work directory,
rendered in headless Chromium as a person would open it; the refusals (existing output, unknown input)."""
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest

from clusmar_beam.app import cli, report
from clusmar_beam.core.errors import InputError
from conftest import read_manifest, write_parquet

CHROMIUM = "/usr/bin/chromium"
IMG = '<img src="data:image/png;base64,'
MAX_BYTES = 5 * 1024 * 1024
SIMULATE_FLAGS = ["--digits", "--rounds", "2", "--batch-size", "50", "--seed-labels", "50", "--repetitions", "2"]


# ---------------------------------------------------------------- checks shared by every page

def _render(html_path, tmp_path, name):
    """A screenshot of the page in headless Chromium; also copied to $CLUSMAR_REPORT_SHOTS when set."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed (`make browser` installs Debian's chromium)")
    png = tmp_path / f"{name}.png"
    profile = tmp_path / f"chromium-profile-{name}"
    profile.mkdir()
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--window-size=1280,4000", f"--screenshot={png}", f"file://{html_path}"],
        capture_output=True, text=True, timeout=120)   # only so a wedged browser cannot hang the suite
    assert png.exists(), f"chromium wrote no screenshot (exit {result.returncode}): {result.stderr[-2000:]}"
    if os.environ.get("CLUSMAR_REPORT_SHOTS"):
        os.makedirs(os.environ["CLUSMAR_REPORT_SHOTS"], exist_ok=True)
        shutil.copy(png, os.path.join(os.environ["CLUSMAR_REPORT_SHOTS"], f"{name}.png"))
    return png


def _assert_not_blank(png):
    import matplotlib.image
    pixels = matplotlib.image.imread(str(png))[..., :3]
    assert pixels.shape[0] >= 1000 and pixels.shape[1] >= 1000, pixels.shape
    assert pixels.std() > 0.05, f"the screenshot is nearly uniform (std {pixels.std():.3f})"
    # a page that failed to load is white; ours paints a tinted background, cards, text and plots
    non_white = np.mean(np.any(pixels < 0.99, axis=-1))
    assert non_white > 0.3, f"only {non_white:.1%} of the screenshot is not white"
    ink = np.mean(np.all(pixels < 0.8, axis=-1))
    assert ink > 0.01, f"only {ink:.2%} of the screenshot is text or drawing"
    # plots are drawn, not just the page's background: many distinct colours
    assert len(np.unique((pixels[::4, ::4] * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 200


def _assert_self_contained(path, plots, texts):
    size = os.path.getsize(path)
    assert 0 < size <= MAX_BYTES, size
    page = open(path, encoding="utf-8").read()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.count(IMG) == plots, (page.count(IMG), plots)
    assert len(re.findall(r"<img\b", page)) == plots          # every image is embedded data
    # nothing that would load from anywhere: no remote src/href/url(), no script, no import
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//|ftp:|file:)""", page, re.I)
    assert not re.search(r"url\(\s*['\"]?\s*(https?:|//)", page, re.I)
    assert "<script" not in page.lower() and "@import" not in page and "<link" not in page.lower()
    assert "http://" not in page and "https://" not in page
    for href in re.findall(r"""href\s*=\s*["']([^"']*)""", page):
        assert href.startswith("#"), href
    for text in texts:
        assert text in page, text
    return page


# ---------------------------------------------------------------- simulation

@pytest.fixture(scope="module")
def simulation(tmp_path_factory):
    """A real `clusmar simulate` run: four strategies, a 2 x 2 sweep, two repetitions."""
    from clusmar_beam.app import simulate
    out = tmp_path_factory.mktemp("simulation") / "sim"
    result = simulate.run(SIMULATE_FLAGS + ["--output", str(out), "--strategies",
                                            "cluster-margin,margin,random,k-center",
                                            "--candidate-multipliers", "2,10", "--target-cluster-sizes", "5,20"])
    return out, result


def test_simulation_report(simulation, tmp_path):
    out, sim = simulation
    summary = report.run(["--input", str(out)])
    html_path = out / "report.html"
    assert summary["output"] == str(html_path) and summary["kind"] == "simulation"
    # learning curves (one grid), the sweep's heatmap, class balance of the picks, timing
    assert summary["plots"] == 4
    page = _assert_self_contained(html_path, 4, [
        "Data and parameters", "Learning curves", "Label savings", "The sweep at a glance",
        "Cluster-margin diagnostics", "Clusterings", "Class balance of the picks", "Timing",
        "cluster-margin vs margin", "cluster-margin vs random", "cluster-margin vs k-center",
        "scikit-learn digits", "k_m share of unlabeled", "candidate clusters per k_t", "share selecting"])
    for setting in sim["settings"]:
        assert setting["name"] in page
    # the pool's size as a person reads it, and one accuracy-table row per (strategy, setting) curve
    assert f"{sim['data']['pool_count']:,}" in page
    accuracy_table = page.split("Mean test accuracy")[1].split("</table>")[0]
    assert accuracy_table.count("<tr>") == 1 + len(sim["summary"])
    # savings: losses say so, settings that never reached the target say so
    values = [r["savings_mean"] for r in sim["savings"]]
    assert ("(loss)" in page) == any(v is not None and v < 0 for v in values)
    assert ("never reached the target" in page) == any(v is None for v in values)
    # warnings are shown prominently, each one
    if sim["warnings"]:
        assert f"Warnings ({len(sim['warnings'])})" in page
        for warning in sim["warnings"]:
            assert report.esc(warning) in page
    _assert_not_blank(_render(html_path, tmp_path, "simulation"))


def test_simulation_without_cluster_margin(tmp_path):
    """Only setting-free strategies: one learning-curve panel, no savings, no heatmap."""
    from clusmar_beam.app import simulate
    out = tmp_path / "sim"
    simulate.run(SIMULATE_FLAGS + ["--output", str(out), "--strategies", "margin,random", "--repetitions", "1"])
    html_path = tmp_path / "elsewhere" / "baselines.html"
    summary = report.run(["--input", str(out), "--output", str(html_path)])
    assert summary["plots"] == 3              # curves, class balance, timing
    page = _assert_self_contained(html_path, 3, ["Learning curves", "No savings were computed",
                                                 "No selection diagnostics were recorded"])
    assert "The sweep at a glance" not in page
    _assert_not_blank(_render(html_path, tmp_path, "simulation-baselines"))


def test_simulation_with_fields_missing(simulation, tmp_path):
    """A simulation.json without its optional parts (summary, savings, timing, diagnostics) still renders:
    the curves are recomputed from the runs and the missing parts say they are missing."""
    out, _ = simulation
    sim = json.load(open(out / "simulation.json"))
    for key in ("summary", "savings", "timing", "clusterings", "warnings"):
        sim.pop(key)
    for run_ in sim["runs"]:
        for r in run_["rounds"]:
            r["diagnostics"] = None
            r.pop("seconds")
            r.pop("pick_class_counts")
    stripped = tmp_path / "stripped"
    stripped.mkdir()
    (stripped / "simulation.json").write_text(json.dumps(sim))
    summary = report.run(["--input", str(stripped)])
    assert summary["plots"] == 1              # the curves, from the runs
    _assert_self_contained(stripped / "report.html", 1, ["No savings were computed", "No clustering was recorded",
                                                         "No selection diagnostics were recorded"])


# ---------------------------------------------------------------- round work directory

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Two real `clusmar round` rounds on a small pool; all of round 1's labels back, half of round 2's."""
    from clusmar_beam.pipelines import generate_pool
    root = tmp_path_factory.mktemp("report-rounds")
    generate_pool.run(["--output", str(root / "pool"), "--num-examples", "2500", "--dim", "16",
                       "--num-classes", "5", "--seed", "7"])
    table = pq.read_table(str(root / "pool" / "pool-00000-of-00001.parquet"))
    label_of = dict(zip(table.column("id").to_pylist(), table.column("label").to_pylist()))
    wd = root / "wd"
    config = root / "round.yaml"
    config.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in {
        "pool": str(root / "pool" / "*.parquet"), "workdir": str(wd), "batch_size": 100,
        "candidate_multiplier": 4, "target_mean_cluster_size": 5, "seed": 3}.items()))
    for round_index, fraction in ((1, 1.0), (2, 0.5)):
        assert cli.main(["round", "--config", str(config), "--round", str(round_index)]) == 0
        rows = read_manifest(str(wd / "rounds" / f"round-{round_index:04d}" / "manifest"))
        ids = np.array([r["id"] for r in rows[:int(len(rows) * fraction)]], dtype=np.int64)
        write_parquet(str(wd / "labels" / f"labels-round-{round_index}.parquet"),
                      {"id": ids, "label": np.array([label_of[i] for i in ids.tolist()], dtype=np.int64)})
    return wd


def test_workdir_report(workdir, tmp_path):
    html_path = tmp_path / "rounds.html"
    summary = report.run(["--input", str(workdir), "--output", str(html_path)])
    assert summary["kind"] == "workdir"
    # cluster sizes, stage times, the latest round's picks by cluster size and margins, class balance
    assert summary["plots"] == 5
    page = _assert_self_contained(html_path, 5, [
        "Overview", "Pool and clustering", "Cluster sizes", "Rounds", "Latest selection: round 2",
        "Every round&#x27;s selection", "Class balance of the picks", "candidate clusters per k_t",
        "picks from singleton clusters", "2,500"])
    manifest = json.load(open(workdir / "rounds" / "round-0002" / "manifest" / "manifest.json"))
    for warning in manifest.get("warnings") or []:
        assert report.esc(f"round 2: {warning}") in page
    # the class table: round 1 has all 100 labels back, round 2 half of them
    classes = page.split("most common class")[1].split("</table>")[0]
    rows = re.findall(r"<tr>(.*?)</tr>", classes)
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in rows]
    assert [c[:3] for c in cells] == [["1", "100", "100"], ["2", "100", "50"]]
    _assert_not_blank(_render(html_path, tmp_path, "workdir"))


def test_workdir_report_without_labels(workdir, tmp_path):
    """Before any label comes back the class plot is skipped and the page says why."""
    bare = tmp_path / "wd"
    shutil.copytree(workdir, bare, ignore=shutil.ignore_patterns("labels", "report*.html"))
    state = json.load(open(bare / "state.json"))
    for info in state["rounds"].values():
        info["parameters"]["labels"] = str(bare / "labels" / "*")
    (bare / "state.json").write_text(json.dumps(state))
    summary = report.run(["--input", str(bare)])
    assert summary["plots"] == 4
    _assert_self_contained(bare / "report.html", 4, ["No labels have come back yet"])


def test_workdir_report_names_a_damaged_labels_file(workdir, tmp_path, capsys):
    damaged = tmp_path / "wd"
    shutil.copytree(workdir, damaged, ignore=shutil.ignore_patterns("report*.html"))
    state = json.load(open(damaged / "state.json"))
    for info in state["rounds"].values():
        info["parameters"]["labels"] = str(damaged / "labels" / "*")
    (damaged / "state.json").write_text(json.dumps(state))
    labels = damaged / "labels" / "labels-round-1.parquet"
    labels.write_bytes(labels.read_bytes()[:-200])                    # a truncated upload
    assert cli.main(["report", "--input", str(damaged)]) == 2
    assert str(labels) in capsys.readouterr().err
    assert not (damaged / "report.html").exists()


# ---------------------------------------------------------------- refusals

def test_existing_output_needs_overwrite(workdir, tmp_path):
    html_path = tmp_path / "r.html"
    html_path.write_text("an earlier report")
    with pytest.raises(InputError, match=re.escape(f"--output {str(html_path)!r}: the file exists; pass --overwrite")):
        report.run(["--input", str(workdir), "--output", str(html_path)])
    assert html_path.read_text() == "an earlier report"
    report.run(["--input", str(workdir), "--output", str(html_path), "--overwrite"])
    assert IMG in html_path.read_text()


def test_output_must_be_html(workdir):
    with pytest.raises(InputError, match="must name an .html file"):
        report.run(["--input", str(workdir), "--output", str(workdir / "state.json"), "--overwrite"])


def test_input_of_neither_kind(tmp_path, capsys):
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    with pytest.raises(InputError, match=re.escape(str(empty)) + ".*neither simulation.json .* nor state.json"):
        report.run(["--input", str(empty)])
    # through the console script: one line on stderr naming the directory, exit status 2
    assert cli.main(["report", "--input", str(empty)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("clusmar")]
    assert len(err) == 1 and str(empty) in err[0] and "neither" in err[0]
    assert cli.main(["report", "--input", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert not os.listdir(empty)


def test_not_a_simulation_file(tmp_path):
    (tmp_path / "simulation.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(InputError, match="not a clusmar simulation file"):
        report.run(["--input", str(tmp_path)])
