"""A damaged .pte or .ptd is refused before the ExecuTorch loader sees it. With a data file cut in half the loader
raised cleanly in 160 loads in one thread, but crashed (SIGSEGV in `load_program`) once in six full test runs
where 20 device agents share a process (tests/test_canary.py's broken release), taking the whole run down."""

import shutil

import pytest

from edgelearn.bundle import INFER_PTD, INFER_PTE
from edgelearn.programs import ProgramFileError, bundle_program, check_program_file


@pytest.mark.parametrize("name, kind", [(INFER_PTE, "pte"), (INFER_PTD, "ptd")])
def test_a_truncated_program_or_data_file_is_refused_with_its_reason(bundle_dir, tmp_path, name, kind):
    data = (bundle_dir / name).read_bytes()
    check_program_file(data[:48], len(data), kind)  # the real file passes
    for cut in (len(data) - 1, len(data) // 2, 100):
        with pytest.raises(ProgramFileError, match=f"infer.{kind} is truncated or damaged"):
            check_program_file(data[:48], cut, kind)
    with pytest.raises(ProgramFileError, match="not an ExecuTorch"):
        check_program_file(b"\0" * 64, 64, kind)
    other = "ptd" if kind == "pte" else "pte"
    with pytest.raises(ProgramFileError, match="not an ExecuTorch"):
        check_program_file(data[:48], len(data), other)
    with pytest.raises(ProgramFileError, match="shorter than its header"):
        check_program_file(data[:20], 20, kind)


def test_a_program_without_segments_has_no_extended_header_and_passes(tmp_path):
    # the portable target keeps its constants inside the flatbuffer: "ET12" and no "eh00"
    head = b"\x1c\x00\x00\x00ET12\x00\x00\x00\x00\x10\x00\x18\x00" + bytes(32)
    check_program_file(head, 2184, "pte")


def test_loading_a_bundle_with_a_cut_data_file_raises_instead_of_crashing(bundle_dir, tmp_path):
    damaged = tmp_path / "bundle"
    shutil.copytree(bundle_dir, damaged)
    ptd = (damaged / INFER_PTD).read_bytes()
    (damaged / INFER_PTD).write_bytes(ptd[: len(ptd) // 2])
    with pytest.raises(ProgramFileError, match="truncated"):
        bundle_program(damaged)
    assert bundle_program(bundle_dir).predict(__import__("numpy").zeros((1, 64), "float32")).shape == (1, 10)
