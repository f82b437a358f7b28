"""leaderboards/attack-cost.md is computed correctly from pytest-benchmark's JSON."""
import json

import pytest

from harness.reports.attack_cost import cost_table, load_benchmarks, render


def bench(attack, batch, median, forward=None, gradient=None, floor_ratio=None):
    info = {"attack": attack, "batch": batch, "library": "ours", "family": "floor" if attack == "floor" else "pgd"}
    if forward is not None:
        info.update(forward_evals=forward, gradient_evals=gradient)
    if floor_ratio is not None:
        info.update(floor_ratio=floor_ratio)
    return {"stats": {"median": median}, "extra_info": info}


def test_floor_ratio_and_rates(tmp_path):
    """The floor ratio is the benchmark's own paired measurement, not a ratio of the medians; an attack without
    gradients has none."""
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"machine_info": {"cpu": {"brand_raw": "Test CPU"}}, "benchmarks": [
        bench("floor", 16, 0.010), bench("floor", 256, 0.100),
        bench("pgd-linf", 16, 0.44, forward=16 * 40, gradient=16 * 40, floor_ratio=1.0625),
        bench("pgd-linf", 256, 4.0, forward=256 * 40, gradient=256 * 40, floor_ratio=1.0375),
        bench("random-sign", 256, 0.002, forward=0, gradient=0),
    ]}))
    frame, machine = load_benchmarks(path)
    table = cost_table(frame).set_index("attack")
    row = table.loc["pgd-linf"]
    assert row["grad / example"] == 40 and row["fwd / example"] == 40
    assert row["floor ratio (batch 16)"] == 1.0625 and row["floor ratio (batch 256)"] == 1.0375
    assert row["ms per 1k examples (batch 256)"] == pytest.approx(1e6 * 4.0 / 256)
    markdown = render(path, tmp_path / "out", command="test").read_text()
    assert "Test CPU" in markdown and "| pgd " in markdown and "1.04" in markdown and "1.06" in markdown
    noise = next(line for line in markdown.splitlines() if "| random-sign" in line)
    assert "—" in noise and "7.81" in noise  # no floor ratio; 2 ms per 256 examples


def test_the_floor_table_shows_each_input_the_floor_was_timed_at(tmp_path):
    """Floors recorded without `inputs` are the clean digits; the others get a column of their own."""
    at_ball = bench("floor", 256, 0.106)
    at_ball["extra_info"].update(inputs="linf-ball", clean_ratio=1.0625)
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"benchmarks": [bench("floor", 256, 0.1), at_ball,
                                               bench("fgsm", 256, 0.1, forward=256, gradient=256, floor_ratio=1.0)]}))
    markdown = render(path, tmp_path / "out", command="test").read_text()
    floor = markdown.split("## The floor")[1]
    header = next(line for line in floor.splitlines() if line.startswith("| batch"))
    assert "clean digits (the floor)" in header and "Linf 0.3 ball" in header and "S-O" not in header
    row = next(line for line in floor.splitlines() if line.startswith("| 256"))
    assert "100.000" in row and "106.000" in row and "1.062" in row and "linf-ball x clean" in header


def test_empty_json_is_a_clear_error(tmp_path):
    (tmp_path / "b.json").write_text(json.dumps({"benchmarks": []}))
    with pytest.raises(ValueError, match="run `tox -e bench` first"):
        load_benchmarks(tmp_path / "b.json")


def test_library_comes_from_the_adapter_and_budgets_are_named(tmp_path):
    """An attack registered through an adapter is credited to its library whatever the JSON says; a benchmarked
    budget other than the default is shown with the attack; the header names no machine folder."""
    entry = bench("autoattack-standard", 256, 1.0, forward=256, gradient=256)
    entry["extra_info"]["options"] = {"steps": 10, "queries": 500}
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"benchmarks": [bench("floor", 256, 0.1), entry,
                                               bench("unregistered-x", 256, 1.0, forward=256, gradient=256)]}))
    frame, _ = load_benchmarks(path)
    by_attack = dict(zip(frame.attack, frame.library))
    assert by_attack["autoattack-standard (queries=500, steps=10)"] == "torchattacks"
    assert by_attack["unregistered-x"] == "ours"  # not registered: as recorded
    markdown = render(path, tmp_path / "out", command="test").read_text()
    assert "from `b.json`" in markdown and str(tmp_path) not in markdown


def test_adapter_overhead_divides_the_adapter_by_the_bare_library_call(tmp_path):
    """A bare-call benchmark carries the paired adapter / library ratio; it never enters the per-attack table."""
    bare = bench("ta-pgd-linf", 256, 2.0)
    bare["extra_info"].update(bare=True, family="bare library call", adapter_ratio=1.05)
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"benchmarks": [bench("floor", 256, 0.05), bare,
                                               bench("ta-pgd-linf", 256, 2.1, forward=256 * 40, gradient=256 * 40)]}))
    frame, _ = load_benchmarks(path)
    assert len(cost_table(frame)) == 1
    markdown = render(path, tmp_path / "out", command="test").read_text()
    row = next(line for line in markdown.split("## Adapter overhead")[1].splitlines() if line.startswith("| ta-pgd-linf"))
    assert "torchattacks" in row and "1.05" in row


def comparison(defense: str, ours: float, autoattack: float) -> dict:
    rows = [{"label": "ours: the benchmark's worst-case cascade", "attack": "fgsm+pgd", "robust": ours, "seconds": 1.0,
             "forward_evals": 100, "gradient_evals": 50, "broken_only_by_this": None, "missed_by_this": None},
            {"label": "AutoAttack standard, original code (pyautoattack)", "attack": "aa-standard", "robust": autoattack,
             "seconds": 9.0, "forward_evals": 2000, "gradient_evals": 1000, "broken_only_by_this": 1, "missed_by_this": 0}]
    return {"benchmark": "b", "defense": defense, "norm": "linf", "eps": 0.3, "examples": 100, "clean": 99.0,
            "ours_columns": ["fgsm", "pgd"], "device": "cpu", "commit": "abc", "date": "2026-12-02T00:00:00", "rows": rows}


def test_the_strength_section_is_rewritten_alone_keeping_the_timings(tmp_path):
    from harness.reports.attack_cost import render_strength

    timings = tmp_path / "b.json"
    timings.write_text(json.dumps({"machine_info": {"cpu": {"brand_raw": "Test CPU"}}, "benchmarks": [
        bench("floor", 16, 0.010), bench("pgd-linf", 16, 0.44, forward=16 * 40, gradient=16 * 40, floor_ratio=1.0625)]}))
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps({"comparisons": [comparison("pgd-at", 64.0, 63.0)]}))
    new.write_text(json.dumps({"comparisons": [comparison("pgd-at", 62.0, 63.0), comparison("trades", 42.0, 43.0)]}))
    page = render(timings, tmp_path / "out", command="test", strength=old).read_text()
    assert "### `pgd-at`" in page and "### `trades`" not in page
    rewritten = render_strength(tmp_path / "out", new).read_text()
    assert rewritten.split("## Strength per cost")[0] == page.split("## Strength per cost")[0]  # timings kept
    assert rewritten.count("## Strength per cost against AutoAttack") == 1 and "### `trades`" in rewritten
    assert "| 62.00 " in rewritten and "| 64.00 " not in rewritten and "**2 of 2**" in rewritten
    assert render_strength(tmp_path / "out", new).read_text() == rewritten  # twice is once
    with pytest.raises(FileNotFoundError, match="no strength-per-cost JSON"):
        render_strength(tmp_path / "out", tmp_path / "missing.json")


def test_a_comparison_without_the_port_row_shows_a_dash_and_says_why():
    from harness.reports.attack_cost import strength_summary

    with_port = comparison("pgd-at", 62.0, 63.0)
    port = {**with_port["rows"][1], "label": "AutoAttack standard, torchattacks' parts", "attack": "autoattack-standard",
            "robust": 63.5}
    with_port = {**with_port, "rows": with_port["rows"] + [port]}
    text = "\n".join(strength_summary([with_port]))
    assert "| 63.5 " in text and "shows -" not in text
    text = "\n".join(strength_summary([with_port, comparison("natural", 22.0, 22.0)]))
    assert "a comparison that ran without it shows -" in text and "| natural " in text and "| -  " in text
    # comparisons from two benchmarks: each row names its benchmark
    text = "\n".join(strength_summary([with_port, {**comparison("atda", 18.4, 14.4), "benchmark": "mnist-li"}]))
    assert "(b, mnist-li," in text and "| atda (mnist-li) " in text and "| pgd-at (b) " in text and "**1 of 2**" in text


def test_the_cost_is_also_given_per_threat_since_the_total_depends_on_which_threats_are_compared():
    from harness.reports.attack_cost import strength_summary

    l2 = {**comparison("pgd-at", 40.0, 41.0), "norm": "l2", "eps": 2.0}
    l2["rows"] = [{**l2["rows"][0], "forward_evals": 200, "gradient_evals": 100}, l2["rows"][1]]  # 300 / 3,000
    text = "\n".join(strength_summary([comparison("pgd-at", 62.0, 63.0), l2, comparison("trades", 42.0, 43.0)]))
    assert "for **0.067** of its model evaluations in total (600 against 9,000" in text
    assert "by threat: L∞ 0.3 0.050 (2 comparisons); L2 2 0.100 (1 comparison)." in text


def test_the_masked_comparisons_get_their_own_share_beside_the_total():
    """A comparison where a column without the model's gradients (Square) broke what every gradient column left
    pays Square's full budget; its share is given apart so that it neither hides nor inflates the sound rows'."""
    from harness.reports.attack_cost import strength_summary

    def with_columns(result, square_broke, ours_evals):
        ours = {**result["rows"][0], "forward_evals": ours_evals, "gradient_evals": 0, "columns": [
            {"label": "clean", "forward_evals": 100, "gradient_evals": 0, "broken_first": 0},
            {"label": "pgd", "forward_evals": 50, "gradient_evals": 50, "broken_first": 3},
            {"label": "square", "forward_evals": ours_evals - 200, "gradient_evals": 0, "broken_first": square_broke}]}
        return {**result, "rows": [ours, result["rows"][1]]}

    masked = {**with_columns(comparison("binarized", 73.4, 73.2), 100, 1500), "commit": "def",
              "date": "2026-12-06T00:00:00"}
    sound = [with_columns(comparison("pgd-at", 62.0, 63.0), 0, 300), with_columns(comparison("trades", 42.0, 43.0), 0, 300)]
    text = "\n".join(strength_summary([*sound, masked]))
    assert "for **0.233** of its model evaluations in total (2,100 against 9,000" in text
    assert ("on the 1 comparison where a column that takes no gradient of the model broke examples every gradient "
            "column had left") in text
    assert "budget: binarized L∞ 0.3) ours spent **0.500** of AutoAttack's evaluations; on the other 2, **0.100**." in text
    assert "commits abc, def, 2026-12-02 to 2026-12-06)" in text
    assert "Apart:" not in "\n".join(strength_summary(sound))  # nothing to set apart
    assert "commit abc, 2026-12-02)" in "\n".join(strength_summary(sound))
