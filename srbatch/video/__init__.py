"""Video I/O: probe, plan keyframe-aligned segments, decode a segment, encode a segment, join segments by packet copy.

Built on PyAV (FFmpeg bundled in its wheels). The upscale job distributes :func:`process_segment`;
:func:`upscale_video_local` is the same pipeline in one process (the reference the job is compared with).
"""

from srbatch.video._types import Colour, Segment, StreamInfo, VideoError, VideoInfo
from srbatch.video.decode import read_frames
from srbatch.video.driver import VideoResult, process_segment, upscale_video_local
from srbatch.video.encode import CODECS, DEFAULT_CONTAINER, SegmentWriter, encode_segment
from srbatch.video.join import JoinResult, join_segments
from srbatch.video.probe import probe
from srbatch.video.segments import plan_segments

from srbatch.io.storage import VIDEO_EXTENSIONS

__all__ = ["CODECS", "DEFAULT_CONTAINER", "VIDEO_EXTENSIONS", "Colour", "JoinResult", "Segment", "SegmentWriter",
           "StreamInfo", "VideoError", "VideoInfo", "VideoResult", "encode_segment", "join_segments", "plan_segments",
           "probe", "process_segment", "read_frames", "upscale_video_local"]
