"""The command line: info on the shipped bundle, config errors that name the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import models
from rnnstream.cli import app
from rnnstream.config import ConfigError, load_config

ASSET = Path(models.__file__).parent / "assets" / "sensor_lstm.safetensors"
REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def test_info_describes_the_shipped_bundle():
    result = runner.invoke(app, ["info", str(ASSET)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "lstm" in result.output and "regression" in result.output and "train_demo_model" in result.output


def test_shipped_kafka_config_is_valid():
    cfg = load_config(REPO / "configs" / "kafka.yaml")
    assert cfg.model == ASSET.resolve() and cfg.source.topics == ["sensor-events"]
    assert cfg.sink.topic == "sensor-forecasts" and cfg.dead_letters.topic == "sensor-events-dlq"


def test_shipped_finetune_config_is_valid():
    cfg = load_config(REPO / "configs" / "kafka-finetune.yaml")
    assert cfg.finetune is not None and cfg.finetune.k2 == 32 and cfg.metrics_port == 9100
    assert cfg.finetune.versions_dir == str((REPO / ".rnnstream" / "versions").resolve())


def test_finetune_config_errors_name_the_key(tmp_path):
    doc = yaml.safe_load((REPO / "configs" / "kafka-finetune.yaml").read_text())
    doc["finetune"]["learning_rate"] = 0.1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"finetune\.learning_rate"):
        load_config(path)


@pytest.mark.parametrize(
    "change,where",
    [
        (lambda c: c["source"].pop("group_id"), "source.kafka.group_id"),
        (lambda c: c["source"].update(format="xml"), "source.kafka.format"),
        (lambda c: c["engine"].update(max_batch=0), "engine.max_batch"),
        (lambda c: c["kafka"].update(colour="blue"), "kafka.colour"),
        (lambda c: c["kafka"]["client"].update(group_id="x"), "kafka.client"),
        (lambda c: c["source"].update(type="carrier-pigeon"), "source"),
        (lambda c: c.pop("kafka"), "kafka"),
        (lambda c: c["kafka"].update(consumer={"isolation.level": "read_uncommitted"}), "kafka.consumer"),
        (lambda c: c["kafka"].update(producer={"transactional.id": "mine"}), "kafka.producer"),
        (lambda c: c["kafka"]["client"].update({"Enable-Auto-Commit": True}), "kafka.client"),
        (lambda c: c["checkpoint"].update(interval_ms=20_000), "checkpoint.interval_ms"),
    ],
)
def test_config_errors_name_the_bad_key(tmp_path, change, where):
    cfg = yaml.safe_load((REPO / "configs" / "kafka.yaml").read_text())
    cfg["model"] = str(ASSET)
    change(cfg)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
        load_config(path)
    result = runner.invoke(app, ["run", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "config error" in result.output
    result = runner.invoke(app, ["check", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and where in result.output


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_check_passes_every_shipped_config_without_contacting_anything(name):
    result = runner.invoke(app, ["check", str(REPO / "configs" / name)], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and result.output.startswith("ok: "), result.output


def test_check_refuses_what_run_would_refuse_at_start(tmp_path):
    wrong = tmp_path / "channels.yaml"
    source = {"type": "csv", "paths": [str(REPO / "configs/data/machines.csv")], "channels": ["a", "b"]}
    wrong.write_text(yaml.safe_dump({"model": str(ASSET), "source": source, "sink": {"type": "stdout"}}))
    result = runner.invoke(app, ["check", str(wrong)], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "channels" in result.output
    missing = tmp_path / "missing.yaml"
    source = {"type": "csv", "paths": [str(tmp_path / "*.csv")]}
    missing.write_text(yaml.safe_dump({"model": str(ASSET), "source": source, "sink": {"type": "stdout"}}))
    result = runner.invoke(app, ["check", str(missing)], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "matches no file" in result.output


def test_bench_lists_its_suites():
    result = runner.invoke(app, ["bench", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "engine|kafka" in result.output


def test_run_refuses_a_pipeline_that_cannot_start_with_a_clear_message(tmp_path):
    path = tmp_path / "nofiles.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": str(ASSET),
                "source": {"type": "csv", "paths": [str(tmp_path / "*.csv")]},
                "sink": {"type": "stdout"},
            }
        )
    )
    result = runner.invoke(app, ["run", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 1 and "matches no file" in result.output
    wrong = tmp_path / "channels.yaml"
    source = {"type": "csv", "paths": [str(path)], "channels": ["a", "b"]}  # the model takes one channel
    wrong.write_text(yaml.safe_dump({"model": str(ASSET), "source": source, "sink": {"type": "stdout"}}))
    result = runner.invoke(app, ["run", str(wrong)], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "channels" in result.output


def test_shipped_sensor_configs_are_valid():
    mqtt = load_config(REPO / "configs" / "sensors-mqtt.yaml", {"mqtt.broker": "127.0.0.1:1884"})
    assert mqtt.source.topic == "sensors/+" and mqtt.sink.topic == "scores/{stream}" and mqtt.source.qos == 1
    assert mqtt.mqtt.broker == "127.0.0.1:1884" and mqtt.scoring.kind == "detector"
    csv = load_config(REPO / "configs" / "sensors-csv.yaml")
    assert Path(csv.source.paths[0]) == (REPO / "configs" / "data" / "machines.csv").resolve()
