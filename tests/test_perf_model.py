"""python -m perf model: the CPU pipeline check end to end, on a shortened ResNet (one block
per stage, 16x16 images) so that it takes seconds: rows, CSV, PNG, the fused model's loss
and gradients checked against eager, saved bytes counted."""
import pytest

from perf import model as perf_model


def test_cpu_pipeline_check_writes_checked_rows(tmp_path):
    rc = perf_model.main(["--out", str(tmp_path), "--cpu-layers", "1,1,1,1", "--cpu-image-size", "16",
                          "--configs", "torch_eager,triton_fuse"])
    assert rc == 0
    csv_path = tmp_path / "model-cpu-interpreter.csv"
    meta, rows = perf_model.read_csv(csv_path)
    assert meta["mode"] == "cpu-interpreter"
    by_config = {r["config"]: r for r in rows}
    assert set(by_config) == {"torch_eager", "triton_fuse", "triton_fuse_abn"}
    assert all(r["status"] == "ok" for r in rows), rows
    assert float(by_config["triton_fuse"]["max_rel_err"]) <= 2e-5
    # In-Place ABN keeps y only: fewer saved bytes than the eager model.
    assert float(by_config["triton_fuse_abn"]["saved_mb"]) < float(by_config["torch_eager"]["saved_mb"])
    assert "not a measurement" in by_config["triton_fuse"]["note"]
    pytest.importorskip("matplotlib")
    assert (tmp_path / "model-cpu-interpreter.png").exists()


def test_unknown_config_is_an_error_row():
    rows = perf_model.check_cpu(("no_such_config",), image_size=16, layers=(1, 1, 1, 1))
    assert rows[0]["status"] == "error" and "unknown config" in rows[0]["note"]
