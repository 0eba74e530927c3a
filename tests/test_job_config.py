"""The upscale job's configuration, planning and keys, without Ray: YAML + flags, errors that name the field and the
fix, deterministic output keys, unsafe keys refused, fingerprint, resource defaults, secrets never printed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from srbatch.errors import ConfigError
from srbatch.upscale.config import UpscaleConfig, build_parser, config_from_args, load_config
from srbatch.upscale.plan import fingerprint, input_root, output_key, relative_key
from srbatch.jobkit.cluster import is_loopback_address
from srbatch.jobkit.resources import ActorResources, plan_actors

ROOT = Path(__file__).resolve().parents[1]


def parse(*argv: str) -> UpscaleConfig:
    return config_from_args(build_parser().parse_args(list(argv)))


def test_yaml_then_flags_override(tmp_path):
    y = tmp_path / "job.yaml"
    y.write_text(
        "input: s3://photos/raw/\noutput: s3://photos/x4/\nmodel: bicubic\nscale: 2\ntile: 128\n"
        "storage_options: {anon: false}\nendpoint-url: http://127.0.0.1:9000\n"
    )
    cfg = parse("--config", str(y), "--scale", "4", "--no-progress", "--storage-option", "use_ssl=false")
    assert (cfg.input, cfg.scale, cfg.tile, cfg.progress) == ("s3://photos/raw/", 4, 128, False)
    so = cfg.fs_options()
    assert so["anon"] is False and so["use_ssl"] is False
    assert so["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:9000"
    assert parse("in/", "--output", "o/").input == "in/"  # positional INPUT
    with pytest.raises(ValueError, match="frozen"):
        cfg.scale = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("yaml_text", "argv", "words"),
    [
        ("input: a\noutput: b\ntile_size: 3\n", [], ["tile_size", "unknown field", "tile_overlap"]),
        ("input: a\n", [], ["output", "required", "--output"]),
        ("input: a\noutput: b\n", ["--scale", "0"], ["scale", "greater than or equal to 1"]),
        ("input: a\noutput: b\nformat: GIF\n", [], ["format", "'PNG'", "'GIF'"]),
        ("input: a\noutput: b\nrun_id: ../x\n", [], ["run_id", "letters, digits"]),
        ("input: a\noutput: b\nquality: 90\n", [], ["quality applies to JPEG and WEBP"]),
        ("input: a\noutput: b\nactors: 3\nmax_actors: 2\n", [], ["max_actors (2) is smaller than actors (3)"]),
        ("input: a\noutput: b\nsha256: abc\n", [], ["sha256", "64 hexadecimal"]),
        ("- just\n- a list\n", [], ["expected a mapping"]),
    ],
)
def test_errors_name_field_and_fix(tmp_path, yaml_text, argv, words):
    y = tmp_path / "bad.yaml"
    y.write_text(yaml_text)
    with pytest.raises(ConfigError) as ei:
        parse("--config", str(y), *argv)
    msg = str(ei.value)
    assert str(y) in msg
    for w in words:
        assert w in msg, msg


def test_help_documents_every_field():
    text = build_parser().format_help()
    for name in UpscaleConfig.model_fields:
        flag = "--storage-option" if name == "storage_options" else "--" + name.replace("_", "-")
        assert flag in text, flag
    assert "Exit codes" in text and "_manifest" in text


def test_command_line_errors_exit_2_and_never_print_secrets(tmp_path):
    y = tmp_path / "job.yaml"
    y.write_text("input: /nonexistent/dir\noutput: out\nstorage_options: {secret: hunter2-SECRET}\n")
    proc = subprocess.run([sys.executable, str(ROOT / "jobs/upscale.py"), "--config", str(y), "-v"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "does not exist" in proc.stderr and "/nonexistent/dir" in proc.stderr
    assert "hunter2" not in proc.stdout + proc.stderr and "***" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "srbatch", "upscale", "--help"], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 0 and "--max-failed-fraction" in proc.stdout and "srbatch upscale" in proc.stdout
    cfg = load_config(None, {"input": "a", "output": "b", "storage_options": {"key": "AKIA", "secret": "s"}})
    assert "AKIA" not in repr(cfg.redacted()) and "s" != cfg.redacted()["storage_options"]["secret"]


def test_output_keys_are_deterministic_and_safe():
    assert input_root("s3://b/photos/**/*.jpg") == "s3://b/photos"
    assert input_root("s3://b/photos/") == "s3://b/photos"
    assert relative_key("s3://b/photos/2024/x.jpg", "s3://b/photos") == "2024/x.jpg"
    assert output_key("2024/x.jpg", "PNG") == "2024/x.png" == output_key("2024/x.jpg", "PNG")
    assert output_key("a b/é.tif", "JPEG") == "a b/é.jpg"
    # NFD input becomes the NFC key, so two spellings of one name cannot make two outputs
    assert output_key("e\u0301.png", "PNG") == "\u00e9.png"
    for bad in ("../x.png", "a/../../x.png", "/abs.png", "a\\b.png", "a//b.png", "./x.png", "_manifest/x.png",
                "a/.srbatch-tmp-1.png", "bad\x07.png"):  # fmt: skip
        with pytest.raises(ConfigError, match="refused|clashes"):
            output_key(bad, "PNG")


def test_fingerprint_changes_with_what_changes_the_bytes():
    base = UpscaleConfig(input="a", output="b")
    ident = {"name": "bicubic", "sha256": None}
    fp = fingerprint(base, ident)
    assert fp == fingerprint(UpscaleConfig(input="other", output="b", run_id="x", actors=3, progress=False), ident)
    for change in ({"scale": 2}, {"format": "JPEG"}, {"dtype": "float16"}, {"tile": 64}, {"reference": "self"}):
        assert fingerprint(base.model_copy(update=change), ident) != fp, change
    assert fingerprint(base, {"name": "bicubic", "sha256": "00"}) != fp


def test_actor_resources():
    cfg = UpscaleConfig(input="a", output="b")
    cpu = plan_actors(cfg, {"CPU": 2.0})
    assert cpu == ActorResources(actors=1, max_actors=1, gpus_per_actor=0.0, cpus_per_actor=1.0, torch_threads=2)
    assert cpu.remote_args() == {"num_cpus": 1.0}
    assert cpu.describe() == "1 actor(s), 0 GPU and 1 CPU each, 2 torch threads"
    gpu = plan_actors(cfg, {"CPU": 16.0, "GPU": 4.0})
    assert (gpu.actors, gpu.gpus_per_actor, gpu.cpus_per_actor) == (4, 1.0, 0.5)
    assert gpu.remote_args() == {"num_cpus": 0.5, "num_gpus": 1.0}
    half = plan_actors(cfg.model_copy(update={"gpus_per_actor": 0.5, "max_actors": 10}), {"CPU": 8.0, "GPU": 2.0})
    assert (half.actors, half.max_actors) == (4, 10)
    assert half.describe() == "4-10 actor(s), 0.5 GPU and 0.5 CPU each"
    # the comparison job sizes its pool the same way (one skeleton)
    from srbatch.compare.config import CompareConfig

    cmp = CompareConfig(images="a", models="bicubic", output="b")
    assert plan_actors(cmp, {"CPU": 16.0, "GPU": 4.0}) == plan_actors(cfg, {"CPU": 16.0, "GPU": 4.0})


@pytest.mark.parametrize(
    "address,loopback",
    [("127.0.0.1:6379", True), ("localhost:6379", True), ("127.0.1.1:6379", True), ("ray://[::1]:10001", True),
     ("http://127.0.0.1:8265", True), ("10.0.0.5:6379", False), ("auto", False), ("ray://head.svc:10001", False),
     (None, False), ("", False)],
)  # fmt: skip
def test_loopback_addresses_are_recognised(address, loopback):
    assert is_loopback_address(address) is loopback
