import io
import tarfile

import numpy as np
import pytest

from edgelearn.bundle import (
    BundleError,
    Manifest,
    dump_weights,
    load_weights,
    pack_release,
    read_release,
    unpack_release,
    verify_bundle,
    write_bundle,
)


def small_bundle(path):
    m = Manifest(
        model_id="m",
        version=1,
        task="classify",
        target="portable",
        input={"shape": [1, 2], "dtype": "float32"},
        trainable=["w"],
    )
    files = {"weights.safetensors": dump_weights({"w": np.arange(4, dtype=np.float32)}), "infer.pte": b"PTE" * 10}
    return write_bundle(path, m, files)


def test_write_then_verify(tmp_path):
    m = small_bundle(tmp_path / "b")
    assert verify_bundle(tmp_path / "b") == m
    assert m.files["infer.pte"]["bytes"] == 30 and len(m.files["infer.pte"]["sha256"]) == 64
    np.testing.assert_array_equal(load_weights(tmp_path / "b")["w"], np.arange(4))
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temp folder left behind


def test_tampered_file_is_refused(tmp_path):
    small_bundle(tmp_path / "b")
    (tmp_path / "b" / "infer.pte").write_bytes(b"EVIL" * 10)
    with pytest.raises(BundleError, match="infer.pte does not match its sha256"):
        verify_bundle(tmp_path / "b")


def test_missing_file_is_refused(tmp_path):
    small_bundle(tmp_path / "b")
    (tmp_path / "b" / "weights.safetensors").unlink()
    with pytest.raises(BundleError, match="weights.safetensors listed in the manifest is missing"):
        verify_bundle(tmp_path / "b")


def test_release_archive_has_manifest_first_and_round_trips(tmp_path):
    m = small_bundle(tmp_path / "b")
    payload = pack_release(tmp_path / "b")
    with tarfile.open(fileobj=io.BytesIO(payload)) as tar:
        names = tar.getnames()
    assert names[0] == "manifest.json" and set(names[1:]) == set(m.files)
    assert unpack_release(payload, tmp_path / "copy") == m
    assert verify_bundle(tmp_path / "copy") == m


def test_tampered_archive_is_refused_and_writes_nothing(tmp_path):
    small_bundle(tmp_path / "b")
    payload = pack_release(tmp_path / "b").replace(b"PTEPTE", b"XXXXXX")
    with pytest.raises(BundleError, match="infer.pte does not match its sha256"):
        unpack_release(payload, tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


def test_archive_with_path_traversal_is_refused(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("manifest.json", b"{}"), ("../evil", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(BundleError):
        read_release(buf.getvalue())


def test_not_a_tar_is_refused():
    with pytest.raises(BundleError, match="not a tar archive|manifest.json is not the first member"):
        read_release(b"hello" * 200)
