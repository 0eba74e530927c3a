"""Listings at scale (srbatch.io.storage.list_images / list_files through srbatch.io.listing) against independent
oracles: boto3's list_objects_v2 paginator on the tests' S3 server, os.walk on a local folder, the key list itself on
memory://. One tree with a prefix over one S3 page (1000 keys), nested and wide folders, hidden files and folders,
_manifest/ and _srbatch/ at the top and deeper, unicode names, top-level files, S3 folder placeholder objects."""

from __future__ import annotations

import os
import posixpath
from concurrent.futures import ThreadPoolExecutor

import pytest

from srbatch.errors import StorageError
from srbatch.io.storage import IMAGE_EXTENSIONS, list_files, list_images

MANY = 1010  # > 1000: S3 lists a prefix in pages of 1000 keys
FANOUT = 6  # the S3 walk's fan-out target in these tests (srbatch.io.listing._S3_FANOUT: 32), for a small tree

TREE = sorted(
    [f"many/{i:04d}.png" for i in range(MANY)]
    + [f"wide/{i:02d}.d/x.jpg" for i in range(FANOUT + 2)]  # more sub-prefixes than FANOUT: the S3 walk stops splitting
    + [
        "top.png", "top.txt", "UPPER.PNG", ".hidden_top.png", "noext",
        "a/b/c/d/e/f/deep.png", "a/b/e.jpg", "a/.git/x.png", "a/b/.cache/y.png", "a/b/.z.png", "a/b/ok.webp",
        "a/.srbatch-tmp-123.png",
        "_manifest/run=1/part-0.parquet", "_manifest/x.png",
        "_srbatch/state.parquet", "_srbatch/runs/r.json", "_srbatch/y.png",
        "sub/_manifest/z.png", "sub/_srbatch/w.png", "sub/_manifestx/kept.png", "sub/v.png",
        "_manifest.png", "ünï/çødé 🙂.png", "日本/画像.PNG", "sp ace/a b.tif",
        "..\\bs.png", "q/..\\r/s.png",  # names with backslashes are path tricks, not hidden names: kept (refused later)
    ]
)  # fmt: skip
SKIP = ("_manifest", "_srbatch")


def _expected_images(rel_keys: list[str]) -> list[str]:
    """The images list_images names, written out: image extension, no part hidden, _manifest or _srbatch ("." and
    ".." parts, and names with a backslash, are not hidden: the jobs refuse those keys with a row each)."""
    out = []
    for k in rel_keys:
        parts = k.split("/")
        if any((p.startswith(".") and p not in (".", "..") and "\\" not in p) or p in SKIP for p in parts):
            continue
        if posixpath.splitext(k)[1].lower() in IMAGE_EXTENSIONS:
            out.append(k)
    return sorted(out)


def _expected_files(rel_keys: list[str], skip_top=SKIP) -> list[str]:
    return sorted(k for k in rel_keys if not ("/" in k and k.split("/", 1)[0] in skip_top))


def test_expectations_are_not_empty():
    # the oracle's filter removes what it should and keeps the rest (so the tests below compare non-trivial lists)
    imgs = _expected_images(TREE)
    assert "a/b/c/d/e/f/deep.png" in imgs and "UPPER.PNG" in imgs and "_manifest.png" in imgs
    for k in (".hidden_top.png", "a/.git/x.png", "a/b/.cache/y.png", "a/b/.z.png", "a/.srbatch-tmp-123.png",
              "_manifest/x.png", "_srbatch/y.png", "sub/_manifest/z.png", "sub/_srbatch/w.png", "top.txt"):
        assert k in TREE and k not in imgs
    assert "..\\bs.png" in imgs and "q/..\\r/s.png" in imgs
    assert "sub/_manifestx/kept.png" in imgs and "sub/_manifest/z.png" not in imgs
    files = _expected_files(TREE)
    assert "a/.srbatch-tmp-123.png" in files and "sub/_manifest/z.png" in files and ".hidden_top.png" in files
    assert not any(k.startswith(("_manifest/", "_srbatch/")) for k in files)


# ------------------------------------------------------------------------------------------------------------ local


@pytest.fixture(scope="module")
def local_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("listing") / "out"
    for k in TREE:
        p = root / k
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    (root / "empty" / "deeper").mkdir(parents=True)
    (root / "only_txt").mkdir()
    (root / "only_txt" / "a.txt").write_bytes(b"")
    os.symlink(root / "a", root / "link_to_dir")  # fsspec lists a symlink as an entry and never follows it
    os.symlink(root / "top.png", root / "link.png")
    os.symlink(root / "missing.png", root / "broken.png")
    return root


def _walk_oracle(root: str, skip_top=(), prune=lambda name: False) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        dirnames[:] = [
            d for d in dirnames if d not in links and not (rel == "." and d in skip_top) and not prune(d)
        ]
        out += [os.path.join(dirpath, f) for f in filenames + links]
    return sorted(p.replace(os.sep, "/") for p in out)


def test_local_list_files_equals_os_walk(local_tree):
    root = str(local_tree)
    expected = _walk_oracle(root, skip_top=SKIP)
    assert len(expected) == len(_expected_files(TREE)) + 4  # + only_txt/a.txt and the three links
    assert list_files(root) == expected
    assert list_files(root + "/") == expected
    assert list_files(f"file://{root}") == expected  # filesystem paths: no protocol
    assert list_files(root, skip_top=()) == _walk_oracle(root)
    # the skipped folders are those at the top of the folder listed
    assert list_files(f"{root}/sub") == [f"{root}/sub/_manifestx/kept.png", f"{root}/sub/v.png"]
    assert list_files(f"{root}/sub", skip_top=()) == sorted(f"{root}/{k}" for k in TREE if k.startswith("sub/"))


def test_local_list_files_absent_prefix_and_single_file(local_tree):
    assert list_files(str(local_tree / "nope")) == []
    assert list_files(str(local_tree / "empty")) == []
    assert list_files(str(local_tree / "top.png")) == [str(local_tree / "top.png")]


def test_local_list_images_equals_os_walk(local_tree):
    root = str(local_tree)
    hidden = lambda name: (name.startswith(".") and "\\" not in name) or name in SKIP  # noqa: E731
    expected = [
        p for p in _walk_oracle(root, prune=hidden)
        if not hidden(posixpath.basename(p)) and posixpath.splitext(p)[1].lower() in IMAGE_EXTENSIONS
    ]  # fmt: skip
    assert expected == sorted([f"{root}/{k}" for k in _expected_images(TREE)] + [f"{root}/link.png",
                                                                                 f"{root}/broken.png"])  # fmt: skip
    assert list_images(root) == expected
    assert list_images(root + "/") == expected
    assert list_images(f"file://{root}") == [f"file://{p}" for p in expected]
    assert list_images(f"{root}/top.png") == [f"{root}/top.png"]
    assert list_images(f"{root}/a/b/*.jpg") == [f"{root}/a/b/e.jpg"]


def test_local_list_images_errors(local_tree):
    with pytest.raises(StorageError, match="does not exist"):
        list_images(str(local_tree / "nope"))
    for folder in ("only_txt", "empty", "_manifest"):  # a skipped name is skipped below the folder listed, not in it
        if folder == "_manifest":
            assert list_images(str(local_tree / folder)) == [str(local_tree / "_manifest/x.png")]
            continue
        with pytest.raises(StorageError, match="no images found"):
            list_images(str(local_tree / folder))


# --------------------------------------------------------------------------------------------------------------- S3


@pytest.fixture
def fanout(monkeypatch):
    """The S3 walk splits prefixes until FANOUT are in hand (fewer requests on this small tree; same code paths)."""
    from srbatch.io import listing

    monkeypatch.setattr(listing, "_S3_FANOUT", FANOUT)


@pytest.fixture(scope="module")
def s3_tree(s3_server):
    import http.client
    import threading
    from urllib.parse import quote, urlsplit

    bucket = "listing-tree"
    host = urlsplit(s3_server)
    local = threading.local()

    def put(path: str) -> None:  # plain HTTP PUTs (moto checks no signature): a third of boto3's time per object
        if not hasattr(local, "c"):
            local.c = http.client.HTTPConnection(host.hostname, host.port, timeout=30)
        local.c.request("PUT", quote(path), body=b"", headers={"Content-Length": "0"})
        r = local.c.getresponse()
        assert r.status == 200, (path, r.status, r.read())
        r.read()

    put(f"/{bucket}")
    keys = [f"out/{k}" for k in TREE] + ["out/placeholder/", "out/a/b/", "outside.png", "out2/x.png"]
    keys += ["out/./dot.png", "out/../up.png", "out/k/./../w.png", "out/.h/./x.png", "out//twice.png"]  # S3 only
    with ThreadPoolExecutor(4) as ex:
        list(ex.map(lambda k: put(f"/{bucket}/{k}"), keys))
    return bucket


def _boto_keys(bucket: str, prefix: str) -> list[str]:
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_s3_list_files_equals_boto3(s3_tree, fanout):
    b = s3_tree
    keys = _boto_keys(b, "out/")
    assert len(keys) == len(TREE) + 7
    expected = sorted(f"{b}/{k}" for k in keys if k[4:].split("/", 1)[0] not in SKIP or "/" not in k[4:])
    extra = ["placeholder/", "a/b/", "./dot.png", "../up.png", "k/./../w.png", ".h/./x.png", "/twice.png"]
    assert expected == sorted(f"{b}/out/{k}" for k in _expected_files(TREE) + extra)
    assert list_files(f"s3://{b}/out") == expected
    assert list_files(f"s3://{b}/out/") == expected
    everything = sorted(f"{b}/{k}" for k in _boto_keys(b, ""))
    assert list_files(f"s3://{b}", skip_top=()) == everything
    # few sub-prefixes a level: the walk splits three levels (a/ -> b/ -> c/ -> d/), then lists d/ recursively
    assert list_files(f"s3://{b}/out/a") == sorted(f"{b}/{k}" for k in _boto_keys(b, "out/a/"))


def test_s3_list_files_absent_prefix_and_single_object(s3_tree):
    b = s3_tree
    assert list_files(f"s3://{b}/nope") == []
    assert list_files(f"s3://{b}/ou") == []  # a prefix of names is not a folder
    assert list_files(f"s3://{b}/outside.png") == [f"{b}/outside.png"]


def test_s3_list_images_equals_boto3(s3_tree, fanout):
    b = s3_tree
    rel = [k[4:] for k in _boto_keys(b, "out/")]
    expected = [f"s3://{b}/out/{k}" for k in _expected_images(rel)]
    assert len(expected) == MANY + FANOUT + 2 + 13 + 4  # + ./dot, ../up, k/./../w, /twice
    assert list_images(f"s3://{b}/out") == expected
    assert list_images(f"s3://{b}/out/") == expected
    assert list_images(f"s3://{b}/out/a") == [f"s3://{b}/out/a/b/c/d/e/f/deep.png", f"s3://{b}/out/a/b/e.jpg",
                                              f"s3://{b}/out/a/b/ok.webp"]  # fmt: skip
    assert list_images(f"s3://{b}/out/top.png") == [f"s3://{b}/out/top.png"]
    assert list_images(f"s3://{b}/out/a/b/*.jpg") == [f"s3://{b}/out/a/b/e.jpg"]
    with pytest.raises(StorageError, match="does not exist"):
        list_images(f"s3://{b}/nope")


# ------------------------------------------------------------------------------------- other backends: fs.find path


def test_memory_backend_keeps_the_plain_path():
    import fsspec

    fs = fsspec.filesystem("memory")
    base = "srbatch-listing-test/out"
    for k in TREE:
        fs.pipe_file(f"{base}/{k}", b"")
    try:
        assert list_images(f"memory://{base}") == [f"memory://{base}/{k}" for k in _expected_images(TREE)]
        assert list_files(f"memory://{base}") == [f"/{base}/{k}" for k in _expected_files(TREE)]
        assert list_files(f"memory://{base}-nope") == []
    finally:
        fs.rm("/srbatch-listing-test", recursive=True)


# -------------------------------------------------------------------------------------------------------- benchmark


def _run_benchmark(capsys, *args: str) -> dict:
    import json

    from srbatch.benchmark.cli import main

    assert main(["listing", "--objects", "45", "--per-folder", "10", "--json", *args]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "45 objects in 5 folders of 10" in out[0]
    return json.loads(out[-1])


def test_listing_benchmark_local(capsys):
    r = _run_benchmark(capsys, "--storage", "local")
    assert [row["method"].split()[0] for row in r["rows"]] == ["fsspec", "list_images", "list_files"]
    assert all(row["seconds"] > 0 and row["storage"] == "local" for row in r["rows"])


@pytest.mark.slow
def test_listing_benchmark_s3(capsys):
    # the benchmark checks every listing against fs.find (exit code 1 otherwise) and counts the list requests
    r = _run_benchmark(capsys, "--storage", "s3", "--concurrency", "3", "--latency-ms", "1")
    rows = {(row["storage"], row["method"].split()[0]): row for row in r["rows"]}
    assert set(rows) == {(s, m) for s in ("s3", "s3+1ms") for m in ("s3fs", "list_images", "list_files", "s3_walk,")}
    assert rows["s3", "s3fs"]["requests"] == 1  # one listing of the prefix without a delimiter: 45 keys, one page
    assert rows["s3", "list_files"]["requests"] == 1 + 5  # the top level with a delimiter, then each folder
