"""srbatch.video on synthetic videos made here: probe, segments, segment decode, encoders, packet-copy join, driver.

References are independent of srbatch.video: the moving pattern the videos are made from, a one-pass decode written
here with PyAV directly, windows and a bicubic x2 computed here, and the source's own audio packets.
"""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from srbatch.errors import ConfigError
from srbatch.video import (
    Colour,
    VideoError,
    encode_segment,
    join_segments,
    plan_segments,
    probe,
    process_segment,
    read_frames,
    upscale_video_local,
)
from srbatch.video._types import VideoInfo

FPS = 25
N = 60  # 2.4 s


def pattern(i: int, h: int, w: int) -> np.ndarray:
    """Frame ``i`` of the moving test pattern: a horizontal ramp sliding 2 px/frame, a vertical one, a checkerboard."""
    y, x = np.mgrid[0:h, 0:w]
    r = ((x + 2 * i) * 255 // w) % 256
    g = (y * 3 + i * 5) % 256
    b = ((x // 8 + y // 8 + i // 3) % 2) * 200 + 30
    return np.stack([r, g, b], -1).astype(np.uint8)


def make_video(path, *, n=N, w=96, h=64, gop=10, codec="libx264", audio="aac", rotation=0, full_range=False,
               pix_fmt="yuv420p", subtitles=False):
    """A test video: the pattern, BT.709 tags, a keyframe every ``gop`` frames, a 440 Hz tone as long as the video,
    optionally two SubRip cues."""
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=FPS)
        s.width, s.height, s.pix_fmt = w, h, pix_fmt
        s.options = ({"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", "crf": "20", "preset": "veryfast"}
                     if codec == "libx264" else {"g": str(gop)})
        s.codec_context.color_range = 2 if full_range else 1
        s.codec_context.colorspace = 1
        if rotation:
            s.set_display_rotation(rotation)
        a = c.add_stream(audio, rate=48000, layout="mono") if audio else None
        sub = c.add_mux_stream("subrip") if subtitles else None
        for i in range(n):
            if sub is not None and i in (5, 40):
                cue = av.Packet(f"cue at frame {i}".encode())
                cue.stream, cue.time_base = sub, Fraction(1, 1000)
                cue.pts = cue.dts = i * 1000 // FPS
                cue.duration = 500
                c.mux(cue)
            f = av.VideoFrame.from_ndarray(pattern(i, h, w), format="rgb24").reformat(
                format=pix_fmt, dst_colorspace=1, dst_color_range=2 if full_range else 1)
            f.pts = i
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
        if a is not None:
            sr, size = 48000, a.codec_context.frame_size or 960
            total = sr * n // FPS
            tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(total) / sr)).astype(np.float32)
            for k in range(0, total, size):
                chunk = np.pad(tone[k:k + size], (0, max(0, k + size - total)))
                af = av.AudioFrame.from_ndarray(chunk[None], format="fltp", layout="mono")
                af.sample_rate, af.pts = sr, k
                for p in a.encode(af):
                    c.mux(p)
            for p in a.encode():
                c.mux(p)
    return str(path)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    return {
        "x264_mkv": make_video(d / "src_x264.mkv", w=64, h=48, audio=None),
        # x264 with B-frames in MP4, AAC, rotated 90 degrees, full colour range
        "x264": make_video(d / "src_x264.mp4", rotation=90, full_range=True),
        # lossless FFV1 4:4:4 in Matroska, Opus, SubRip cues
        "ffv1": make_video(d / "src_ffv1.mkv", w=64, h=48, codec="ffv1", audio="libopus", pix_fmt="yuv444p",
                           subtitles=True),
    }


def decode_all(path) -> list[np.ndarray]:
    """Every frame in one pass, straight from PyAV, converted with the stream's own tags."""
    out = []
    with av.open(str(path)) as c:
        for f in c.decode(video=0):
            if f.format.name.startswith("gbr"):
                out.append(f.to_ndarray(format="rgb24"))
            else:
                out.append(f.to_ndarray(format="rgb24", src_colorspace=int(f.colorspace) if f.colorspace in (1, 5, 6)
                                        else 5, src_color_range=2 if f.color_range == 2 else 1))
    return out


def keyframe_flags(path) -> list[int]:
    """Indices of the frames the decoder reports as keyframes (a decode, not a packet scan)."""
    with av.open(str(path)) as c:
        return [i for i, f in enumerate(c.decode(video=0)) if f.key_frame]


def packets(path, kind: str) -> list[tuple[bytes, float | None]]:
    with av.open(str(path)) as c:
        s = [x for x in c.streams if x.type == kind][0]
        return [(bytes(p), None if p.pts is None else float(p.pts * p.time_base)) for p in c.demux(s) if p.size]


def bicubic_x2(rgb: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].double()
    up = F.interpolate(t, scale_factor=2, mode="bicubic", align_corners=False)
    return up.round().clamp(0, 255)[0].permute(1, 2, 0).to(torch.uint8).numpy()


def temporal_x2(window: list[np.ndarray]) -> np.ndarray:
    """A stand-in temporal model: (t-1 + 2 t + t+1) / 4, then bicubic x2."""
    a, b, c = (w.astype(np.int32) for w in window)
    return bicubic_x2(((a + 2 * b + c + 2) // 4).astype(np.uint8))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


# ------------------------------------------------------------------------------------------------------------ probe


def test_probe_figures(videos):
    x = probe(videos["x264"])
    assert (x.codec, x.width, x.height, x.frames, x.declared_frames) == ("h264", 96, 64, N, N)
    assert x.fps == FPS and x.duration == pytest.approx(N / FPS)
    assert x.frame_pts == tuple(sorted(x.frame_pts)) and len(set(x.frame_pts)) == N
    assert x.rotation == 90
    assert x.colour.range == 2 and x.colour.space == 1
    assert [s.type for s in x.streams] == ["audio"] and x.streams[0].codec == "aac"
    assert x.streams[0].sample_rate == 48000 and x.streams[0].channels == 1
    assert list(x.keyframe_indices) == keyframe_flags(videos["x264"]) == list(range(0, N, 10))

    f = probe(videos["ffv1"])
    assert (f.codec, f.width, f.height, f.frames, f.pix_fmt) == ("ffv1", 64, 48, N, "yuv444p")
    assert f.declared_frames is None  # Matroska does not count frames: the packet scan does
    assert f.fps == FPS and f.time_base == Fraction(1, 1000) and f.duration == pytest.approx(N / FPS)
    assert f.rotation == 0 and f.colour.range == 1
    assert [(s.type, s.codec) for s in f.streams] == [("audio", "opus"), ("subtitle", "srt")]
    assert list(f.keyframe_indices) == keyframe_flags(videos["ffv1"])


# --------------------------------------------------------------------------------------------------------- segments


def _info(n: int, keys: list[int]) -> VideoInfo:
    return VideoInfo(uri="x", container="c", codec="h264", width=2, height=2, pix_fmt=None, fps=Fraction(25),
                     time_base=Fraction(1, 25), frames=n, declared_frames=None, frame_pts=tuple(range(n)),
                     frame_duration=1, keyframes=tuple((k, k) for k in keys), colour=Colour(), rotation=0)


@pytest.mark.parametrize("n,keys,target,overlap", [
    (60, list(range(0, 60, 10)), 20, 2), (60, list(range(0, 60, 10)), 7, 0), (60, list(range(0, 60, 12)), 20, 5),
    (100, [0, 3, 4, 50, 97], 10, 3), (37, [0], 5, 2), (1, [0], 5, 1), (90, list(range(0, 90, 30)), 200, 4),
])
def test_segments_cover_every_frame_once(n, keys, target, overlap):
    info = _info(n, keys)
    segs = plan_segments(info, target_frames=target, overlap=overlap)
    covered = [i for s in segs for i in range(s.start, s.end)]
    assert covered == list(range(n))  # in order, each frame once
    for s in segs:
        assert s.start in keys and s.seek_index in keys
        assert s.read_start == max(0, s.start - overlap) and s.read_end == min(n, s.end + overlap)
        assert s.seek_index <= s.read_start and not any(s.seek_index < k <= s.read_start for k in keys)
        assert s.seek_pts == info.frame_pts[s.seek_index]
    assert len({s.id for s in segs}) == len(segs)
    assert plan_segments(info, target_frames=target, overlap=overlap) == segs  # stable ids across reruns
    if len(keys) == 1:
        assert len(segs) == 1
    if target < n and len(keys) > n // target:
        assert len(segs) > 1


def test_plan_segments_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="target_frames"):
        plan_segments(_info(10, [0]), target_frames=0)
    with pytest.raises(ConfigError, match="overlap"):
        plan_segments(_info(10, [0]), target_frames=5, overlap=-1)


# ----------------------------------------------------------------------------------------------------- read_frames


@pytest.mark.parametrize("name", ["x264", "ffv1"])
def test_segment_frames_equal_one_pass_decode(videos, name):
    path = videos[name]
    whole = decode_all(path)
    assert len(whole) == N
    info = probe(path)
    segs = plan_segments(info, target_frames=15, overlap=3)
    assert len(segs) >= 3
    for s in segs:
        got = list(read_frames(path, s))
        assert [i for i, _ in got] == list(range(s.read_start, s.read_end))
        for i, rgb in got:
            assert rgb.dtype == np.uint8 and rgb.shape == (info.height, info.width, 3)
            assert np.array_equal(rgb, whole[i]), f"{name}: frame {i} of segment {s.id}"
    # the colour conversion is right: the decoded frames are the pattern they were made from (x264: compare luma,
    # 4:2:0 blurs the pattern's sharp colour edges; decoding full range as limited would give ~7.7 here)
    h, w = info.height, info.width
    luma = np.array([0.2126, 0.7152, 0.0722])
    if name == "x264":
        err = np.mean([np.abs(whole[i] @ luma - pattern(i, h, w) @ luma).mean() for i in range(N)])
        assert err < 4, err
    else:
        err = np.mean([np.abs(whole[i].astype(int) - pattern(i, h, w)).mean() for i in range(N)])
        assert err < 1.5, err


def test_full_range_yuv444_decodes_to_the_pattern(tmp_path):
    """Full range tagged on a plain yuv444p stream (not a yuvj format) must be honoured on decode."""
    path = make_video(tmp_path / "full.mkv", n=6, w=64, h=48, codec="ffv1", audio=None, pix_fmt="yuv444p",
                      full_range=True)
    info = probe(path)
    assert info.colour.range == 2 and info.pix_fmt == "yuv444p"
    got = list(read_frames(path, plan_segments(info, target_frames=6)[0]))
    assert len(got) == 6
    assert max(np.abs(rgb.astype(int) - pattern(i, 48, 64)).mean() for i, rgb in got) < 1.5


# --------------------------------------------------------------------------------------------------------- encoders


@pytest.mark.parametrize("codec,ext", [("libvpx-vp9", ".webm"), ("libsvtav1", ".mp4"), ("libx264", ".mkv"),
                                       ("ffv1", ".mkv")])
def test_encode_segment_codecs(tmp_path, codec, ext):
    frames = [pattern(i, 64, 64) for i in range(8)]
    tb = Fraction(1, 12800)
    out = str(tmp_path / f"seg{ext}")
    n = encode_segment([(512 * (100 + i), f) for i, f in enumerate(frames)], out, fps=Fraction(25), time_base=tb,
                       codec=codec, pix_fmt="bgr0" if codec == "ffv1" else None, preset="8" if codec == "libsvtav1"
                       else None)
    assert n == 8
    info = probe(out)
    assert info.frames == 8 and info.keyframe_indices[0] == 0
    # timestamps continue the source's: frame 0 of this segment is at 100 frames = 4 s
    assert float(info.frame_pts[0] * info.time_base) == pytest.approx(4.0)
    back = decode_all(out)
    if codec == "ffv1":
        assert all(np.array_equal(a, b) for a, b in zip(back, frames))  # bgr0: lossless RGB
    else:
        assert min(psnr(a, b) for a, b in zip(back, frames)) > 24


def test_encoder_configuration_errors(tmp_path):
    f = [(0, pattern(0, 48, 64))]
    kw = dict(fps=Fraction(25), time_base=Fraction(1, 25))
    with pytest.raises(ConfigError, match=r"\.mkv"):
        encode_segment(f, str(tmp_path / "a.mp4"), codec="ffv1", **kw)
    with pytest.raises(ConfigError, match="codec"):
        encode_segment(f, str(tmp_path / "a.mp4"), codec="h265", **kw)
    with pytest.raises(ConfigError, match="even"):
        encode_segment([(0, pattern(0, 47, 64))], str(tmp_path / "a.mp4"), codec="libx264", **kw)


# ------------------------------------------------------------------------------------------------- driver and join


def test_ffv1_segments_join_without_seam(videos, tmp_path):
    """A temporal x2 (window t-1, t, t+1) through 3 segments equals the whole video processed in one piece here,
    bit for bit (lossless RGB FFV1); frame count, timestamps, fps and duration kept; the Opus packets copied as is."""
    src = videos["ffv1"]
    dst = str(tmp_path / "out.mkv")
    res = upscale_video_local(src, dst, temporal_x2, segment_frames=20, radius=1, codec="ffv1", pix_fmt="bgr0",
                              work_dir=str(tmp_path / "work"))
    assert len(res.segments) >= 3
    whole = decode_all(src)
    expected = [temporal_x2([whole[max(t - 1, 0)], whole[t], whole[min(t + 1, N - 1)]]) for t in range(N)]
    got = decode_all(dst)
    assert len(got) == N
    bad = [t for t in range(N) if not np.array_equal(got[t], expected[t])]
    assert bad == [], f"frames differing from the one-piece result: {bad}"
    si, oi = probe(src), probe(dst)
    assert (oi.width, oi.height, oi.frames, oi.fps) == (128, 96, N, si.fps)
    assert oi.frame_pts == si.frame_pts and abs(oi.duration - si.duration) < 1 / FPS
    assert packets(dst, "audio") == packets(src, "audio")
    assert packets(dst, "subtitle") == packets(src, "subtitle") and [t for _, t in packets(src, "subtitle")] == [0.2, 1.6]


def test_x264_join_keeps_rotation_range_and_audio(videos, tmp_path):
    src = videos["x264"]
    dst = str(tmp_path / "out.mp4")
    res = upscale_video_local(src, dst, bicubic_x2, segment_frames=20, codec="libx264", crf=18, preset="veryfast",
                              work_dir=str(tmp_path / "work"))
    assert len(res.segments) == 3
    si, oi = probe(src), probe(dst)
    assert (oi.codec, oi.width, oi.height, oi.frames, oi.fps) == ("h264", 192, 128, N, FPS)
    assert oi.frame_pts == si.frame_pts and abs(oi.duration - si.duration) < 1 / FPS
    assert oi.rotation == 90 and oi.colour.range == 2 and oi.colour.space == 1
    for uri in res.segment_uris:  # each segment file is tagged too (a job may publish them before the join)
        seg = probe(uri)
        assert seg.rotation == 90 and seg.colour.range == 2 and seg.keyframe_indices[0] == 0
    assert packets(dst, "audio") == packets(src, "audio")
    whole = decode_all(src)
    got = decode_all(dst)
    assert len(got) == N
    luma = np.array([0.2126, 0.7152, 0.0722])  # 4:2:0 blurs the pattern's colour edges: compare luma (~41-45 dB)
    assert min(psnr(g @ luma, bicubic_x2(w) @ luma) for g, w in zip(got, whole)) > 38


def test_join_refuses_missing_segment(videos, tmp_path):
    src = videos["ffv1"]
    info = probe(src)
    segs = plan_segments(info, target_frames=20)
    uris = []
    for s in segs:
        uris.append(str(tmp_path / f"{s.id}.mkv"))
        process_segment(src, s, info, lambda f: f, uris[-1], codec="ffv1")
    with pytest.raises(VideoError, match=f"segments hold {N - segs[1].frames} frames"):
        join_segments([uris[0], uris[2]], src, str(tmp_path / "out.mkv"))
    # FFV1 cannot go into .mov: refused by name; SubRip cannot go into .mp4: left out and listed
    with pytest.raises(VideoError, match=r"\.mov file cannot hold ffv1 video; write \.mkv"):
        join_segments(uris, src, str(tmp_path / "out.mov"))
    joined = join_segments(uris, src, str(tmp_path / "out.mp4"))
    assert joined.skipped_streams == ("2:srt",) and list(joined.copied_packets) == [1]
    out = probe(str(tmp_path / "out.mp4"))
    assert out.frames == N and [s.codec for s in out.streams] == ["opus"]
    with pytest.raises(ConfigError, match="ffv1"):  # and FFV1 segments are refused by .mp4 segment writers
        encode_segment([(0, pattern(0, 48, 64))], str(tmp_path / "x.mp4"), codec="ffv1", fps=Fraction(25),
                       time_base=Fraction(1, 25))
    with pytest.raises(ConfigError, match="overlap"):
        process_segment(src, segs[0], info, temporal_x2, str(tmp_path / "x.mkv"), radius=1, codec="ffv1")


def test_failed_segment_leaves_no_output(videos, tmp_path):
    """A frame function that fails mid-segment leaves nothing at the segment's path (what a resuming job checks)."""
    src = videos["ffv1"]
    info = probe(src)
    seg = plan_segments(info, target_frames=20)[1]
    calls = []

    def flaky(rgb):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("actor killed")
        return rgb

    out = tmp_path / "seg" / f"{seg.id}.mkv"
    with pytest.raises(RuntimeError, match="actor killed"):
        process_segment(src, seg, info, flaky, str(out), codec="ffv1")
    assert list((tmp_path / "seg").iterdir()) == []
    assert process_segment(src, seg, info, lambda f: f, str(out), codec="ffv1") == seg.frames
    assert [p.name for p in (tmp_path / "seg").iterdir()] == [out.name] and probe(str(out)).frames == seg.frames


def test_vp9_segments_join_and_audio_the_container_cannot_hold(videos, tmp_path):
    src = videos["x264"]  # AAC audio, which WebM cannot hold
    info = probe(src)
    uris = []
    for s in plan_segments(info, target_frames=20):
        uris.append(str(tmp_path / f"{s.id}.webm"))
        process_segment(src, s, info, lambda f: f, uris[-1], codec="libvpx-vp9", crf=30, preset="8")
    with pytest.raises(VideoError, match=r"\.webm file cannot hold the source's audio stream 1 \(aac\).*\.mkv"):
        join_segments(uris, src, str(tmp_path / "out.webm"))
    assert not (tmp_path / "out.webm").exists()
    join_segments(uris, src, str(tmp_path / "out.mkv"))
    out = probe(str(tmp_path / "out.mkv"))
    assert (out.codec, out.frames, out.rotation) == ("vp9", N, 90) and abs(out.duration - info.duration) < 1 / FPS
    # MP4 -> Matroska: the same audio bytes; times in ms, all streams shifted alike so that AAC's priming packet (at
    # -1024 samples) is not negative: audio and video move together
    got, ref = packets(str(tmp_path / "out.mkv"), "audio"), packets(src, "audio")
    assert [b for b, _ in got] == [b for b, _ in ref]
    shift = got[0][1] - ref[0][1]
    assert all(abs(g - r - shift) <= 0.001 for (_, g), (_, r) in zip(got, ref))
    video_shift = float(out.frame_pts[0] * out.time_base - info.frame_pts[0] * info.time_base)
    assert abs(video_shift - shift) <= 0.001


# ----------------------------------------------------------------------------------------------- broken input


def test_truncated_and_corrupt_videos_name_the_frame(videos, tmp_path):
    data = open(videos["ffv1"], "rb").read()
    info = probe(videos["ffv1"])
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(VideoError, match=r"truncated.*frame \d+ \(pts \d+"):
        probe(str(cut))
    # planned on the whole file, read after it was cut: the reader says where the stream ended
    segs = plan_segments(info, target_frames=20)
    assert segs[1].start < 0.6 * N < segs[1].end  # the cut falls in the middle segment
    with pytest.raises(VideoError, match=r"ends at frame (3\d) \(pts \d+\).*corrupt after frame \1"):
        list(read_frames(str(cut), segs[1]))
    with pytest.raises(VideoError, match=r"no frame could be decoded from frame 40 \(the keyframe at pts 1600\)"):
        list(read_frames(str(cut), segs[2]))
    bad = bytearray(data)
    mid = len(bad) // 2
    bad[mid:mid + 200] = bytes(200)
    broken = tmp_path / "broken.mkv"
    broken.write_bytes(bytes(bad))
    with pytest.raises(VideoError, match=r"decoding failed at frame \d+ \(after pts \d+\)"):
        for s in plan_segments(probe(str(broken)), target_frames=20):
            list(read_frames(str(broken), s))
    # x264 in Matroska, a cluster zeroed: the demuxer skips the damaged packets; probe reports where frames are missing
    data = open(videos["x264_mkv"], "rb").read()
    bad = bytearray(data)
    bad[len(bad) // 2: len(bad) // 2 + 200] = bytes(200)
    holes = tmp_path / "holes.mkv"
    holes.write_bytes(bytes(bad))
    damaged = probe(str(holes))
    assert damaged.frames < N and damaged.gaps
    (i, pts, missing), = damaged.gaps
    assert 0 < i < damaged.frames and missing == N - damaged.frames and pts == damaged.frame_pts[i]
    assert probe(videos["x264_mkv"]).gaps == () and probe(videos["x264"]).gaps == ()
    mp4 = tmp_path / "cut.mp4"
    mp4.write_bytes(open(videos["x264"], "rb").read()[:5000])
    with pytest.raises(VideoError, match="moov"):
        probe(str(mp4))


# -------------------------------------------------------------------------------------------------------------- S3


def test_s3_source_segments_and_output(videos, s3_bucket, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.put_file(videos["ffv1"], f"{s3_bucket}/in/clip.mkv")
    fs.invalidate_cache()
    src, dst = f"s3://{s3_bucket}/in/clip.mkv", f"s3://{s3_bucket}/out/clip.mkv"
    info = probe(src)
    assert (info.frames, info.width, info.height) == (N, 64, 48)
    res = upscale_video_local(src, dst, bicubic_x2, segment_frames=20, codec="ffv1", pix_fmt="bgr0",
                              work_dir=f"s3://{s3_bucket}/work")
    fs.invalidate_cache()
    assert sorted(fs.ls(f"{s3_bucket}/work")) == sorted(u[len("s3://"):] for u in res.segment_uris)
    local = tmp_path / "back.mkv"
    fs.get_file(f"{s3_bucket}/out/clip.mkv", str(local))
    got = decode_all(local)
    assert len(got) == N
    assert all(np.array_equal(g, bicubic_x2(w)) for g, w in zip(got, decode_all(videos["ffv1"])))
    assert packets(local, "audio") == packets(videos["ffv1"], "audio")
