"""A file-system error anywhere in a command is one line naming the path and the fix, with
exit status 2: a path through a regular file, a file where a folder belongs, no permission,
a read-only or full disk."""

from __future__ import annotations

import errno

import pytest
from monofast import cli
from monofast.cli import _os_error_message


def test_a_run_folder_under_a_regular_file_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    assert cli.main(["data", "--preset", "smoke", "--run", str(blocker / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("monofast: error: ") and str(blocker) in err and "a file where monofast needs a folder" in err
    assert blocker.read_text() == "not a folder"  # nothing was written over it


def test_a_stage_folder_that_is_a_file_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "data").write_text("x")
    assert cli.main(["data", "--preset", "smoke", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{run / 'data'} is a file where monofast needs a folder" in err


@pytest.mark.parametrize("number, says", [
    (errno.ENOSPC, "the disk is full writing {path}; free some space"),
    (errno.EDQUOT, "the disk is full writing {path}"),
    (errno.EACCES, "permission denied: {path}; give this user access to it"),
    (errno.EPERM, "permission denied: {path}"),
    (errno.EROFS, "{path} is on a read-only file system; write to a writable folder with --run"),
    (errno.ENOTDIR, "{path} is a file where monofast needs a folder"),
    (errno.EEXIST, "{path} is a file where monofast needs a folder"),
    (errno.ENOENT, "{path} does not exist; check the path"),
    (errno.EIO, "Input/output error ({path}); check the path and the disk"),
])
def test_each_kind_of_file_system_error_names_the_path_and_the_fix(tmp_path, number, says):
    path = str(tmp_path / "missing" / "x.bin")
    message = _os_error_message(OSError(number, "Input/output error" if number == errno.EIO else "reason", path))
    assert says.format(path=path) in message and "\n" not in message


def test_a_folder_where_a_file_belongs_is_named(tmp_path):
    folder = tmp_path / "meta.json"
    folder.mkdir()
    assert _os_error_message(IsADirectoryError(errno.EISDIR, "Is a directory", str(folder))).startswith(
        f"{folder} is a folder where monofast needs a file; remove it")


def test_other_errors_on_existing_paths_give_no_wrong_advice(tmp_path):
    """A disk error on a file that exists, or a full folder, is not called a file in a
    folder's place (nor the reverse): the reason and the path, as the system gave them."""
    file, folder = tmp_path / "a.bin", tmp_path / "stage"
    file.write_bytes(b"x")
    folder.mkdir()
    for err in (OSError(errno.EIO, "Input/output error", str(file)), OSError(errno.ENOTEMPTY, "Directory not empty", str(folder)),
                OSError(errno.EEXIST, "File exists", str(folder))):
        message = _os_error_message(err)
        assert message.startswith(f"{err.strerror} ({err.filename}); check the path"), message


def test_an_error_without_a_file_name_keeps_its_own_words():
    message = _os_error_message(OSError(errno.EACCES, "/x/shard-00001.bin: Permission denied"))
    assert message.startswith("/x/shard-00001.bin: Permission denied; then run") and "permission denied: ;" not in message


def test_a_native_error_without_a_file_name_gets_the_path(tmp_path):
    """The native hash names no file in the exception's fields; `hash_file` adds it, so the
    CLI's line can name the path."""
    from monofast.common.files import hash_file

    folder = tmp_path / "weights.safetensors"
    folder.mkdir()
    with pytest.raises(OSError) as info:
        hash_file(folder)
    assert info.value.filename == str(folder)
    assert _os_error_message(info.value).startswith(f"{folder} is a folder where monofast needs a file")
