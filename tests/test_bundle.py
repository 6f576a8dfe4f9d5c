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


def test_bundle_never_replaces_a_folder_that_is_not_a_bundle(tmp_path):
    # Prepare: someone's folder with a file in it
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "thesis.tex").write_text("years of work")
    # Execute / Assert: refused with a one-line reason, the file is still there
    with pytest.raises(BundleError, match="non-empty folder that is not a bundle"):
        small_bundle(tmp_path / "project")
    assert (tmp_path / "project" / "thesis.tex").read_text() == "years of work"
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="is a file"):
        small_bundle(tmp_path / "file")


def test_rewriting_a_bundle_swaps_it_atomically(tmp_path):
    from edgelearn.atomic import exchange

    # Prepare: a bundle, and two plain folders to probe the system's atomic exchange
    small_bundle(tmp_path / "b")
    (tmp_path / "x").mkdir(), (tmp_path / "y").mkdir()
    (tmp_path / "x" / "a").write_text("x"), (tmp_path / "y" / "a").write_text("y")
    # Execute
    swapped = exchange(tmp_path / "x", tmp_path / "y")
    small_bundle(tmp_path / "b")  # replaces the existing bundle
    # Assert: this file system swaps atomically, and the replaced bundle leaves nothing behind
    assert swapped and (tmp_path / "x" / "a").read_text() == "y"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "x", "y"]
    verify_bundle(tmp_path / "b")
