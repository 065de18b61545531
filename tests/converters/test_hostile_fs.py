"""A hostile or changing file system: links in and around outputs, racing outputs, inputs that shrink.

rbe never writes through a symbolic link it did not create, never replaces an
output that appeared while it worked (without --force), never embeds a file
that a link inside a model directory pulls in from elsewhere, and turns an
input truncated under it into one error line.
"""

import hashlib
import os

import numpy as np
import pytest
from conftest import tree_digest, write_safetensors

from rbe_converters import decode
from rbe_converters.cli import main
from rbeformat import FormatError, OutputExistsError, Reader, Writer, atomic, publish
from rbeformat.codecs.blob.byteplane import Byteplane
from rbeformat.codecs.blob.raw import Raw


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("rbe: error: "), err
    return err


def partials(root) -> list[str]:
    return [os.path.join(d, f) for d, dirs, files in os.walk(root) for f in files + dirs if f.endswith(".partial")]


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def container(model_dir, tmp_path, capsys):
    """A lossless container of the sample model directory (it holds 1_Pooling/config.json and config.json)."""
    out = str(tmp_path / "m.rbe")
    assert main(["convert", model_dir[0], out, "--quiet"]) == 0
    capsys.readouterr()
    return out


@pytest.fixture
def outside(tmp_path):
    """A directory outside every output, holding a file that must never change."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "authorized_keys").write_bytes(b"ssh-ed25519 AAAA the user's key\n")
    (folder / "config.json").write_bytes(b"the user's own config\n")
    return folder


# -- decode --force into a directory holding links -------------------------------------------------


def test_a_linked_directory_inside_the_output_is_refused_not_followed(container, tmp_path, outside, capsys):
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(outside, out / "1_Pooling")  # the container holds 1_Pooling/config.json
    before = tree_digest(str(outside))
    assert main(["decode", container, str(out), "--force", "--quiet"]) == 4
    err = one_error_line(capsys)
    assert f"{out / '1_Pooling'}: is a symbolic link" in err and str(outside) in err
    assert tree_digest(str(outside)) == before
    assert sorted(os.listdir(out)) == ["1_Pooling"] and os.path.islink(out / "1_Pooling")
    assert partials(tmp_path) == []


def test_a_refusal_at_the_start_is_the_one_line_on_stderr_even_with_the_progress_bar(
    container, tmp_path, outside, capsys
):
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(outside / "config.json", out / "config.json")
    assert main(["decode", container, str(out), "--force"]) == 4  # no --quiet: the bar has not drawn yet
    assert "is a symbolic link" in one_error_line(capsys)


def test_a_link_where_the_container_has_a_file_is_refused(container, tmp_path, outside, capsys):
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(outside / "authorized_keys", out / "config.json")
    before = digest(outside / "authorized_keys")
    assert main(["decode", container, str(out), "--force", "--quiet"]) == 4
    assert f"{out / 'config.json'}: is a symbolic link" in one_error_line(capsys)
    assert digest(outside / "authorized_keys") == before and os.path.islink(out / "config.json")
    assert partials(tmp_path) == []


def test_a_link_deeper_down_is_refused(tmp_path, outside, capsys):
    with Writer(tmp_path / "deep.rbe") as w:
        w.add_array("w", np.ones(4, np.float32))
        w.add_file("a/b/c.txt", b"from the container")
    out = tmp_path / "out"
    (out / "a").mkdir(parents=True)
    os.symlink(outside, out / "a" / "b")
    assert main(["decode", str(tmp_path / "deep.rbe"), str(out), "--force", "--quiet"]) == 4
    assert f"{out / 'a' / 'b'}: is a symbolic link" in one_error_line(capsys)
    assert sorted(os.listdir(outside)) == ["authorized_keys", "config.json"]


def test_a_link_swapped_in_after_the_check_is_not_followed(container, tmp_path, outside, monkeypatch):
    """The race the descriptors close: a directory replaced by a link between the check and the writes."""
    out = tmp_path / "out"
    (out / "1_Pooling").mkdir(parents=True)
    original = atomic.ExistingDirectory.create

    def swap_then_create(self, rel):
        if os.path.isdir(out / "1_Pooling") and not os.path.islink(out / "1_Pooling"):
            os.rename(out / "1_Pooling", tmp_path / "moved")
            os.symlink(outside, out / "1_Pooling")
        return original(self, rel)

    monkeypatch.setattr(atomic.ExistingDirectory, "create", swap_then_create)
    before = tree_digest(str(outside))
    assert main(["decode", container, str(out), "--force", "--quiet"]) == 0
    assert tree_digest(str(outside)) == before  # written into the directory opened at the check
    assert (tmp_path / "moved" / "config.json").exists()


def test_kept_files_are_listed_without_following_links(container, tmp_path, outside, capsys):
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(outside, out / "elsewhere")  # not a path of the container: kept, and not walked
    os.symlink(outside / "authorized_keys", out / "keys")
    (out / "notes.txt").write_text("mine")
    assert main(["decode", container, str(out), "--force", "--quiet"]) == 0
    assert capsys.readouterr().err == f"rbe: {out}: kept 3 files not in the container: elsewhere, keys, notes.txt\n"
    assert os.path.islink(out / "elsewhere") and os.path.islink(out / "keys")
    assert sorted(os.listdir(outside)) == ["authorized_keys", "config.json"]


def test_the_output_path_as_typed_may_go_through_a_link(container, model_dir, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "via")
    assert main(["decode", container, str(tmp_path / "via" / "back"), "--quiet"]) == 0
    assert tree_digest(str(real / "back")) == tree_digest(model_dir[0])
    (real / "existing").mkdir()
    os.symlink(real / "existing", tmp_path / "named")  # the named directory itself is a link: used as named
    assert main(["decode", container, str(tmp_path / "named"), "--force", "--quiet"]) == 0
    assert tree_digest(str(real / "existing")) == tree_digest(model_dir[0])


# -- a link as a file output -----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["decode", "convert"])
def test_a_link_as_the_output_file_is_refused_even_with_force(command, container, model_dir, tmp_path, outside, capsys):
    victim = outside / "authorized_keys"
    before = digest(victim)
    link = tmp_path / ("x.safetensors" if command == "decode" else "x.rbe")
    os.symlink(victim, link)
    source = container if command == "decode" else model_dir[0]
    assert main([command, source, str(link), "--force", "--quiet"]) == 4
    assert f"{link}: is a symbolic link (to {victim})" in one_error_line(capsys)
    assert digest(victim) == before and os.path.islink(link)
    assert partials(tmp_path) == []


def test_writer_refuses_a_link(tmp_path, outside):
    os.symlink(outside / "authorized_keys", tmp_path / "w.rbe")
    with pytest.raises(OutputExistsError, match="symbolic link"):
        Writer(tmp_path / "w.rbe", force=True)


# -- two outputs racing for one path --------------------------------------------------------------


def test_two_writers_racing_without_force_the_second_loses(tmp_path):
    path = tmp_path / "w.rbe"
    first, second = Writer(path, threads=1), Writer(path, threads=1)  # both checked while the path was free
    first.add_array("w", np.ones(4, np.float32))
    second.add_array("w", np.zeros(4, np.float32))
    first.close()
    kept = digest(path)
    with pytest.raises(OutputExistsError, match="appeared while this output was being written"):
        second.close()
    assert digest(path) == kept and partials(tmp_path) == []
    with Reader(path) as r:
        assert r.get_tensor("w").tolist() == [1, 1, 1, 1]


def test_with_force_the_last_writer_wins(tmp_path):
    path = tmp_path / "w.rbe"
    first, second = Writer(path, force=True, threads=1), Writer(path, force=True, threads=1)
    first.add_array("w", np.ones(4, np.float32))
    second.add_array("w", np.zeros(4, np.float32))
    first.close()
    second.close()
    with Reader(path) as r:
        assert r.get_tensor("w").tolist() == [0, 0, 0, 0]


@pytest.fixture(params=["renameat2", "fallback"])
def publishing(request, monkeypatch):
    """Each way of publishing without replacing: renameat2, and the fallbacks where it is missing."""
    if request.param == "renameat2" and publish.RENAMEAT2 is None:
        pytest.skip("renameat2 is not available here")
    if request.param == "fallback":
        monkeypatch.setattr(publish, "RENAMEAT2", None)
    return request.param


def test_convert_loses_the_race_to_an_output_made_meanwhile(model_dir, tmp_path, capsys, monkeypatch, publishing):
    """Another program makes the output between rbe's check and its rename: exit 4, the other file kept."""
    out = tmp_path / "m.rbe"
    original = publish.rename_noreplace

    def other_program_first(src, dst, **kwargs):
        out.write_bytes(b"the other program's output")
        return original(src, dst, **kwargs)

    monkeypatch.setattr("rbeformat.writer.rename_noreplace", other_program_first)
    assert main(["convert", model_dir[0], str(out), "--quiet"]) == 4
    assert f"{out}: appeared while this output was being written" in one_error_line(capsys)
    assert out.read_bytes() == b"the other program's output" and partials(tmp_path) == []


def test_a_file_output_loses_the_race(tmp_path, publishing):
    path = tmp_path / "x.safetensors"
    with pytest.raises(OutputExistsError, match="appeared while"):
        with atomic.atomic_file(str(path), force=False) as fh:
            fh.write(b"new")
            path.write_bytes(b"theirs")
    assert path.read_bytes() == b"theirs" and partials(tmp_path) == []


def test_a_file_output_without_hard_links_still_never_replaces(tmp_path, monkeypatch):
    monkeypatch.setattr(publish, "RENAMEAT2", None)

    def no_links(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(publish.os, "link", no_links)
    path = tmp_path / "x.safetensors"
    with atomic.atomic_file(str(path), force=False) as fh:
        fh.write(b"new")
    assert path.read_bytes() == b"new" and partials(tmp_path) == []
    with pytest.raises(OutputExistsError):
        with atomic.atomic_file(str(tmp_path / "y.safetensors"), force=False) as fh:
            fh.write(b"new")
            (tmp_path / "y.safetensors").write_bytes(b"theirs")
    assert (tmp_path / "y.safetensors").read_bytes() == b"theirs" and partials(tmp_path) == []


@pytest.mark.parametrize("theirs", ["empty directory", "directory", "file"])
def test_a_new_directory_loses_the_race(container, tmp_path, capsys, monkeypatch, publishing, theirs):
    out = tmp_path / "out"
    original = decode.write_directory

    def other_program_meanwhile(r, target, verify, progress):
        original(r, target, verify, progress)
        if theirs == "file":
            out.write_bytes(b"theirs")
        else:
            out.mkdir()
            if theirs == "directory":
                (out / "theirs.txt").write_bytes(b"theirs")

    monkeypatch.setattr(decode, "write_directory", other_program_meanwhile)
    assert main(["decode", container, str(out), "--quiet"]) == 4
    assert f"{out}: appeared while this output was being written" in one_error_line(capsys)
    if theirs == "file":
        assert out.read_bytes() == b"theirs"
    else:
        assert os.listdir(out) == ([] if theirs == "empty directory" else ["theirs.txt"])
    assert partials(tmp_path) == []


# -- convert DIR: links that leave the directory ---------------------------------------------------


def small_model(folder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(str(folder / "model.safetensors"), {"w": np.arange(16, dtype=np.float32).reshape(4, 4)})
    (folder / "config.json").write_text('{"model_type": "toy"}')


@pytest.mark.parametrize("kind", ["file", "directory", "relative"])
def test_convert_refuses_a_link_out_of_the_directory(tmp_path, outside, capsys, kind):
    model = tmp_path / "model"
    small_model(model)
    if kind == "file":
        link, target = model / "README.md", outside / "authorized_keys"
    elif kind == "directory":
        link, target = model / "extras", outside
    else:
        link, target = model / "notes.txt", os.path.join("..", "outside", "config.json")
    os.symlink(target, link)
    out = tmp_path / "m.rbe"
    assert main(["convert", str(model), str(out), "--quiet"]) == 3
    err = one_error_line(capsys)
    assert f"{link}: is a symbolic link to {target}" in err and "outside" in err
    assert not out.exists() and partials(tmp_path) == []


def test_convert_follows_links_that_stay_inside(tmp_path, capsys):
    model = tmp_path / "model"
    small_model(model)
    (model / "sub").mkdir()
    os.symlink("../config.json", model / "sub" / "config.json")
    os.symlink("sub", model / "alias")  # a link to a directory inside: its files are listed where they are
    out = tmp_path / "m.rbe"
    assert main(["convert", str(model), str(out)]) == 0
    err = capsys.readouterr().err
    assert f"rbe: {model}: embedding 2 files: config.json, sub/config.json\n" in err
    with Reader(out) as r:
        assert sorted(r.files()) == ["config.json", "model.safetensors", "sub/config.json"]


def hf_cache(tmp_path) -> tuple:
    """A Hugging Face cache: snapshots/REV/ holds links into the model's blobs/."""
    repo = tmp_path / "hub" / "models--org--toy"
    staging = tmp_path / "staging"
    small_model(staging)
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd"
    (snapshot / "sub").mkdir(parents=True)
    for name in ("model.safetensors", "config.json"):
        blob = hashlib.sha256((staging / name).read_bytes()).hexdigest()
        os.rename(staging / name, repo / "blobs" / blob)
        os.symlink(os.path.join("..", "..", "blobs", blob), snapshot / name)
    os.symlink(os.path.join("..", "..", "..", "blobs", blob), snapshot / "sub" / "config.json")
    return repo, snapshot


def test_convert_accepts_a_hugging_face_cache_snapshot(tmp_path, capsys):
    repo, snapshot = hf_cache(tmp_path)
    out = tmp_path / "m.rbe"
    assert main(["convert", str(snapshot), str(out), "--quiet"]) == 0
    assert main(["decode", str(out), str(tmp_path / "back"), "--quiet"]) == 0
    assert tree_digest(str(tmp_path / "back")) == tree_digest(str(snapshot))


def test_a_cache_snapshot_may_not_link_outside_its_own_blobs(tmp_path, outside, capsys):
    repo, snapshot = hf_cache(tmp_path)
    other = tmp_path / "hub" / "models--org--other" / "blobs"
    other.mkdir(parents=True)
    (other / "abc").write_text("another model's file")
    os.symlink(other / "abc", snapshot / "extra.json")
    assert main(["convert", str(snapshot), str(tmp_path / "m.rbe"), "--quiet"]) == 3
    assert f"{snapshot / 'extra.json'}: is a symbolic link to {other / 'abc'}" in one_error_line(capsys)


def test_onnx_external_data_may_link_into_a_cache_snapshots_blobs(tmp_path, capsys):
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    repo = tmp_path / "hub" / "models--org--onnx"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "rev" / "onnx"
    snapshot.mkdir(parents=True)
    (repo / "blobs" / "weights").write_bytes(np.arange(16, dtype=np.float32).tobytes())
    os.symlink(os.path.join("..", "..", "..", "blobs", "weights"), snapshot / "model.onnx_data")
    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4, 4], data_location=TensorProto.EXTERNAL)
    entry = t.external_data.add()
    entry.key, entry.value = "location", "model.onnx_data"
    graph = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["y"])],
        "g",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [t],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (snapshot / "model.onnx").write_bytes(model.SerializeToString())
    assert main(["convert", str(snapshot / "model.onnx"), str(tmp_path / "m.rbe"), "--quiet"]) == 0
    with Reader(tmp_path / "m.rbe") as r:
        assert r.get_tensor("w").tobytes() == np.arange(16, dtype=np.float32).tobytes()
    os.symlink(tmp_path / "hub" / "models--org--onnx" / "blobs" / "weights", tmp_path / "elsewhere")
    os.unlink(snapshot / "model.onnx_data")
    os.symlink(tmp_path / "elsewhere", snapshot / "model.onnx_data")  # still lands in the blobs: allowed
    assert main(["convert", str(snapshot / "model.onnx"), str(tmp_path / "n.rbe"), "--quiet"]) == 0


# -- an input that shrinks while it is decoded -----------------------------------------------------


def big_container(path, codec) -> None:
    rng = np.random.default_rng(3)
    with Writer(path, codec=codec, threads=1) as w:
        for i in range(4):
            w.add_array(f"w{i}", rng.standard_normal((256, 256)).astype(np.float32))
        w.add_file("config.json", b"{}")


@pytest.mark.parametrize("codec", [Byteplane(), Raw()], ids=["byteplane", "raw"])
@pytest.mark.parametrize("output", ["directory", "single"])
def test_decode_of_a_file_truncated_underneath_is_one_error(tmp_path, capsys, monkeypatch, codec, output):
    src = tmp_path / "t.rbe"
    big_container(src, codec)
    original = decode.write_shard

    def truncate_first(r, *args):
        os.truncate(src, 4096)  # the reader opened the whole file; now most of it is gone
        return original(r, *args)

    monkeypatch.setattr(decode, "write_shard", truncate_first)
    out = tmp_path / ("out" if output == "directory" else "out.safetensors")
    assert main(["decode", str(src), str(out), "--quiet"]) == 3
    err = one_error_line(capsys)
    assert f"{src}: file changed or truncated while reading" in err
    assert not out.exists() and partials(tmp_path) == []


def test_verify_and_reads_of_a_truncated_file_raise_format_error(tmp_path):
    src = tmp_path / "t.rbe"
    big_container(src, Raw())
    with Reader(src) as r:
        os.truncate(src, 4096)
        with pytest.raises(FormatError, match="truncated while reading"):
            r.get_tensor("w1")
        with pytest.raises(FormatError, match="truncated while reading"):
            list(r.verify())


def test_verify_command_on_a_file_truncated_after_opening(tmp_path, capsys, monkeypatch):
    src = tmp_path / "t.rbe"
    big_container(src, Byteplane())
    original = Reader.verify

    def truncate_first(self, deep=False):
        os.truncate(src, 4096)
        return original(self, deep)

    monkeypatch.setattr(Reader, "verify", truncate_first)
    assert main(["verify", str(src), "--quiet"]) == 3
    assert "file changed or truncated while reading" in one_error_line(capsys)


def test_map_raw_hands_out_views_of_the_mapped_file(tmp_path):
    a = np.arange(1000, dtype=np.float32)
    with Writer(tmp_path / "r.rbe", codec=Raw()) as w:
        w.add_array("a", a)
    with Reader(tmp_path / "r.rbe", map_raw=True) as r:
        view = r.get_tensor("a")
        assert not view.flags.writeable and view.tobytes() == a.tobytes()
        del view
    with Reader(tmp_path / "r.rbe") as r:  # by default: a copy, read with positional reads
        copy = r.get_tensor("a")
        assert copy.flags.writeable and copy.tobytes() == a.tobytes()


def test_large_reads_are_assembled_from_short_preads(tmp_path, monkeypatch):
    """pread returns at most ~2 GiB per call: a longer section is read in several calls."""
    src = tmp_path / "t.rbe"
    big_container(src, Byteplane())
    real = os.pread
    monkeypatch.setattr("rbeformat.reader.os.pread", lambda fd, n, offset: real(fd, min(n, 1000), offset))
    with Reader(src) as r:
        assert r.get_tensor("w2").shape == (256, 256)
        assert list(r.verify(deep=True)) == []
