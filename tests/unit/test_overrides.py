"""A load request's parameters and the private directory its files go to; the fingerprint
poll mode compares."""

import os

import pytest

from server.errors import InvalidInput
from server.models.overrides import check_files, parse_load_parameters, remove_private_copy, write_private_copy
from server.models.polling import fingerprint


def test_parameters_split_into_config_and_files():
    config, files = parse_load_parameters("m", {"config": "{}", "file:1/model.onnx": b"onnx", "file:warmup/x": b"1"})
    assert config == "{}" and files == {"1/model.onnx": b"onnx", "warmup/x": b"1"}
    for parameters, fragment in (
        ({"turbo": "1"}, "unknown parameter 'turbo'"),
        ({"config": b"{}"}, "'config' must be a string"),
        ({"file:1/model.onnx": "text"}, "must carry the file's bytes"),
    ):
        with pytest.raises(InvalidInput, match="failed to load 'm'") as error:
            parse_load_parameters("m", parameters)
        assert fragment in str(error.value)


@pytest.mark.parametrize(
    "relative, fragment",
    [
        ("../model.onnx", "'..'"),
        ("1/../../x", "'..'"),
        ("./1/model.onnx", "'.'"),
        ("/abs/model.onnx", "relative"),
        ("1\\model.onnx", "relative"),
        ("1/model.onnx\0", "relative"),
        ("", "relative"),
        ("1/" + "a" * 256, "longer than 255 bytes"),
        ("/".join(["abcdefgh"] * 120), "at most 1024"),
    ],
)
def test_paths_that_could_leave_the_private_directory_are_refused(relative, fragment):
    with pytest.raises(InvalidInput) as error:
        check_files("m", {relative: b"x"}, "{}")
    assert fragment in str(error.value)


def test_files_need_a_config_and_a_plain_model_name():
    with pytest.raises(InvalidInput, match="need a 'config'"):
        check_files("m", {"1/model.onnx": b"x"}, None)
    with pytest.raises(InvalidInput, match="one path component"):
        check_files("../m", {"1/model.onnx": b"x"}, "{}")


def test_private_copy_holds_the_files_for_the_load_only():
    root = write_private_copy("m", {"1/model.onnx": b"onnx", "warmup/x": b"1"})
    model_dir = root / "m"
    assert (model_dir / "1" / "model.onnx").read_bytes() == b"onnx"
    assert (model_dir / "warmup" / "x").read_bytes() == b"1"
    assert oct((model_dir / "1" / "model.onnx").stat().st_mode & 0o777) == "0o600"
    remove_private_copy(root)
    assert not root.exists()


def test_files_that_clash_are_refused_and_leave_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with pytest.raises(InvalidInput, match="cannot be laid out as files"):
        write_private_copy("m", {"1": b"a file", "1/model.onnx": b"under it"})
    assert list(tmp_path.iterdir()) == []


def test_fingerprint_sees_content_and_time_but_not_hidden_files(tmp_path):
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "model.onnx").write_bytes(b"abc")
    first = fingerprint(tmp_path)
    (tmp_path / "1" / ".model.onnx.part").write_bytes(b"being written")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("x")
    assert fingerprint(tmp_path) == first
    os.utime(tmp_path / "1" / "model.onnx", ns=(1, 1))
    assert fingerprint(tmp_path) != first
    (tmp_path / "1" / ".model.onnx.part").rename(tmp_path / "2.onnx")
    assert [entry[0] for entry in fingerprint(tmp_path)] == ["1/model.onnx", "2.onnx"]
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    assert fingerprint(tmp_path)[-1] == ("loop", -1, -1, -1, -1)
