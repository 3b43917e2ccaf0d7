"""Secrets in the service config: only ``${env:NAME}`` / ``${file:/path}`` references, a literal refused
naming the key, and no secret in an error, a repr, a dump or ``rnnstream check``'s output."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from rnnstream.cli import app
from rnnstream.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
ASSET = REPO / "models" / "assets" / "sensor_lstm.safetensors"
SECRET = "Hu7nt3r2x"  # short: pydantic would cut a long one out of the middle of an input it quotes
ENV = "RNNSTREAM_TEST_SECRET"
runner = CliRunner()


def _config(tmp_path: Path, change) -> Path:
    """configs/kafka.yaml (checked without contacting a broker) with ``change`` applied."""
    cfg = yaml.safe_load((REPO / "configs" / "kafka.yaml").read_text())
    cfg["model"] = str(ASSET)
    change(cfg)
    path = tmp_path / "secret.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _all_text(exc: BaseException) -> str:
    """An exception as a traceback would print it, its causes included."""
    return "".join(traceback.format_exception(exc))


LITERALS = [
    (
        lambda c: c["kafka"]["client"].update(sasl_plain_password=SECRET),
        "kafka.client",
        "sasl_plain_password",
    ),
    (lambda c: c["kafka"]["client"].update({"sasl.password": SECRET}), "kafka.client", "sasl.password"),
    (
        lambda c: c["kafka"].update(producer={"ssl.key.password": SECRET}),
        "kafka.producer",
        "ssl.key.password",
    ),
    (lambda c: c["kafka"].update(consumer={"ssl_password": SECRET}), "kafka.consumer", "ssl_password"),
    (lambda c: c["kafka"]["client"].update({"ssl.key.pem": SECRET}), "kafka.client", "ssl.key.pem"),
    (lambda c: c.update(mqtt={"username": "u", "password": SECRET}), "mqtt.password", "password"),
    (lambda c: c.update(mqtt={"tls": {"key_password": SECRET}}), "mqtt.tls.key_password", "key_password"),
]


@pytest.mark.parametrize("change,where,key", LITERALS)
def test_a_literal_secret_is_refused_naming_the_key_and_never_shown(tmp_path, change, where, key):
    path = _config(tmp_path, change)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert where in str(info.value) and key in str(info.value) and "${env:NAME}" in str(info.value)
    assert SECRET not in _all_text(info.value)  # not in the message, nor in the ValidationError behind it
    for command in ("check", "run"):
        result = runner.invoke(app, [command, str(path)], env={"COLUMNS": "200"})
        assert result.exit_code == 2 and where in result.output, result.output
        assert SECRET not in result.output


def _with_references(secret_file: Path):
    def change(cfg: dict) -> None:
        cfg["kafka"]["client"] = {
            "security_protocol": "SASL_SSL",
            "sasl_plain_username": "alice",
            "sasl_plain_password": f"${{env:{ENV}}}",
        }
        cfg["kafka"]["producer"] = {"ssl.key.password": f"${{file:{secret_file}}}"}
        cfg["mqtt"] = {
            "username": "alice",
            "password": f"${{file:{secret_file}}}",
            "tls": {"ca_file": "/etc/ssl/ca.pem", "key_password": f"${{env:{ENV}}}"},
        }

    return change


def test_env_and_file_references_resolve_and_are_never_shown(tmp_path, monkeypatch):
    from rnnstream.config_secrets import reveal, revealed

    monkeypatch.setenv(ENV, SECRET)
    secret_file = tmp_path / "password"
    secret_file.write_text(SECRET + "\n")  # as `echo` writes it: the newline is not part of the secret
    cfg = load_config(_config(tmp_path, _with_references(secret_file)))
    client = revealed(cfg.kafka.client)
    assert client == {
        "security_protocol": "SASL_SSL",
        "sasl_plain_username": "alice",
        "sasl_plain_password": SECRET,
    }
    assert revealed(cfg.kafka.producer) == {"ssl.key.password": SECRET}
    assert reveal(cfg.mqtt.password) == SECRET and reveal(cfg.mqtt.tls.key_password) == SECRET
    for shown in (repr(cfg), str(cfg), cfg.model_dump_json(), str(cfg.model_dump()), repr(cfg.kafka.client)):
        assert SECRET not in shown
    result = runner.invoke(app, ["check", str(tmp_path / "secret.yaml")], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and result.output.startswith("ok: "), result.output
    assert SECRET not in result.output


@pytest.mark.parametrize(
    "reference,cause",
    [
        (
            "${env:RNNSTREAM_TEST_UNSET_VARIABLE}",
            "environment variable RNNSTREAM_TEST_UNSET_VARIABLE is not set",
        ),
        ("${file:relative/password}", "needs an absolute path"),
        ("${file:/nonexistent/rnnstream/password}", "cannot read /nonexistent/rnnstream/password"),
        ("$ENV_STYLE", "a secret must come from the environment or a file"),
    ],
)
def test_a_reference_that_cannot_be_resolved_names_the_key_and_the_cause(tmp_path, reference, cause):
    path = _config(tmp_path, lambda c: c["kafka"]["client"].update(sasl_plain_password=reference))
    with pytest.raises(ConfigError, match=r"kafka\.client") as info:
        load_config(path)
    assert "sasl_plain_password" in str(info.value) and cause in str(info.value)


def test_settings_that_are_not_secrets_pass_through_unchanged(tmp_path):
    settings = {"security_protocol": "SSL", "ssl_cafile": "/ca.pem", "sasl.username": "u", "linger_ms": 5}
    cfg = load_config(_config(tmp_path, lambda c: c["kafka"].update(client=settings)))
    assert cfg.kafka.client == settings


def test_the_mqtt_connection_repr_hides_its_passwords():
    from connectors.mqtt import Connection, Tls

    conn = Connection("127.0.0.1:8883", "c", password=SECRET, tls=Tls("/ca.pem", key_password=SECRET))
    assert SECRET not in repr(conn) and "/ca.pem" in repr(conn)


def test_mqtt_tls_files_are_relative_to_the_config_file(tmp_path):
    tls = {"ca_file": "certs/ca.pem", "cert_file": "/abs/client.pem", "key_file": "certs/client.key"}
    cfg = load_config(_config(tmp_path, lambda c: c.update(mqtt={"tls": tls})))
    assert cfg.mqtt.tls is not None and cfg.mqtt.tls.check_hostname
    got = (cfg.mqtt.tls.ca_file, cfg.mqtt.tls.cert_file, cfg.mqtt.tls.key_file)
    assert got == (tmp_path / "certs/ca.pem", Path("/abs/client.pem"), tmp_path / "certs/client.key")
