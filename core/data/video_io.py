"""Video clips in a data set: probe, choose the frames to train on, decode them, write preview clips.

Decoding is PyAV's (FFmpeg bindings, maintained, wheels for every platform; no torchvision).
Frame sampling follows the reference video trainers (musubi-tuner's `target_frames` /
`frame_extraction`, diffusion-pipe's frame buckets): a target frame count (4k+1: a causal video
VAE such as Wan's keeps the first frame and folds every 4 after it into one latent frame), a frame
stride or a target fps, and the windows of a long clip (`head`: its start, `uniform`: evenly spread,
`slide`: back to back). A clip shorter than the target trains at the largest 4k+1 count it holds
(a frame-count bucket); images train as one-frame videos beside clips.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from PIL import Image

from core.data.image_io import ImageReadError

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".m4v")  # animated .gif too: see `is_clip`
WINDOW_MODES = ("head", "uniform", "slide")
FRAME_MULTIPLE = 4  # frame counts are FRAME_MULTIPLE * k + 1


class VideoReadError(ImageReadError):
    """A clip could not be used; the message says why and what to do."""


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    width: int
    height: int
    frames: int      # decodable frames
    fps: float

    @property
    def duration(self) -> float:
        return self.frames / self.fps if self.fps else 0.0


def is_clip(path: Path, image_frames: int = 1) -> bool:
    """A video file, or an animated GIF (`image_frames`: what the image probe counted)."""
    suffix = path.suffix.lower()
    return suffix in VIDEO_EXTENSIONS or (suffix == ".gif" and image_frames > 1)


def probe_video(path: str | Path) -> VideoInfo:
    """Size, frame count and fps of a clip; the frames are counted by decoding when the header lacks them."""
    import av

    path = Path(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoReadError(f"{path.name}: has no video stream. Remove it or re-export it as MP4.")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or Fraction(0)
            frames, width, height = 0, stream.codec_context.width, stream.codec_context.height
            for frame in container.decode(stream):
                frames += 1
                width, height = frame.width, frame.height
    except VideoReadError:
        raise
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise VideoReadError(f"{path.name}: not a readable video ({exc}). Re-export it as MP4 (H.264) "
                             "or remove it.") from exc
    if frames == 0:
        raise VideoReadError(f"{path.name}: holds no decodable frame. Re-export it as MP4 (H.264) or remove it.")
    return VideoInfo(path, width, height, frames, float(rate) if rate else 0.0)


def frame_bucket(available: int, target: int) -> int:
    """The frame count a clip trains at: the target, or the largest 4k+1 it holds when shorter."""
    count = min(available, target)
    return max(1, (count - 1) // FRAME_MULTIPLE * FRAME_MULTIPLE + 1)


def round_frames(count: int) -> int:
    """`count` rounded down to 4k+1 (the target frame counts a causal video VAE takes)."""
    return frame_bucket(count, count)


def frame_windows(total: int, fps: float, *, frames: int, stride: int = 1, target_fps: float = 0.0,
                  mode: str = "head", count: int = 1) -> list[tuple[int, ...]]:
    """The frame indices of each training window of a clip of `total` frames.

    Every `stride`-th frame, or (`target_fps` > 0) the frames nearest to `target_fps`; windows of
    `frames` frames (fewer, 4k+1, for a short clip) at the head, spread uniformly (`count` of them),
    or back to back (`slide`, up to `count`; 0: all).
    """
    if mode not in WINDOW_MODES:
        raise ValueError(f"video_windows '{mode}' is not one of {', '.join(WINDOW_MODES)}.")
    step = fps / target_fps if target_fps > 0 and fps > 0 else float(max(1, stride))
    sampled = [round(i * step) for i in range(int((total - 1) / step) + 1)]
    sampled = [i for i in sampled if i < total]
    n = frame_bucket(len(sampled), frames)
    starts: list[int]
    if mode == "head" or len(sampled) <= n:
        starts = [0]
    elif mode == "uniform":
        room = len(sampled) - n
        wanted = max(1, count)
        starts = sorted({round(room * k / (wanted - 1)) if wanted > 1 else 0 for k in range(wanted)})
    else:
        starts = list(range(0, len(sampled) - n + 1, n))
        if count > 0:
            starts = starts[:count]
    return [tuple(sampled[s:s + n]) for s in starts]


def read_frames(path: str | Path, indices: tuple[int, ...]) -> list[Image.Image]:
    """The frames at `indices` (ascending) as RGB pictures, decoded once from the start."""
    import av

    path = Path(path)
    wanted = set(indices)
    found: dict[int, Image.Image] = {}
    try:
        with av.open(str(path)) as container:
            for number, frame in enumerate(container.decode(video=0)):
                if number in wanted:
                    found[number] = frame.to_image().convert("RGB")
                if number >= max(indices):
                    break
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise VideoReadError(f"{path.name}: not a readable video ({exc}). Re-export it as MP4 or remove it.") from exc
    missing = [i for i in indices if i not in found]
    if missing:
        raise VideoReadError(f"{path.name}: frame {missing[0]} could not be decoded (the clip is shorter than "
                             "its header says). Re-export it or remove it.")
    return [found[i] for i in indices]


def middle_frame(path: str | Path) -> Image.Image:
    """The clip's middle frame (what the captioners and the Dataset tab's thumbnail take)."""
    info = probe_video(path)
    return read_frames(path, (info.frames // 2,))[0]


def write_clip(frames: list[Image.Image], path: str | Path, fps: float = 16.0) -> Path:
    """An H.264 mp4 (yuv420p: every player) of the pictures, written to a temporary name and renamed."""
    import av

    from core.atomic import atomic_path

    path = Path(path)
    width, height = frames[0].size
    # yuv420p needs even sides.
    width, height = width // 2 * 2 or 2, height // 2 * 2 or 2
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"crf": "18"}
            for picture in frames:
                picture = picture.convert("RGB")
                if picture.size != (width, height):
                    picture = picture.crop((0, 0, width, height))
                for packet in stream.encode(av.VideoFrame.from_image(picture)):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return path


def clip_seconds(frames: int, fps: float) -> str:
    return f"{frames / fps:.1f} s" if fps else "? s"


def windows_note(total: int, frames: int) -> str:
    """Why a clip trains at fewer frames than asked, for the health check and the scan's warnings."""
    return f"{total} frame(s) after sampling, fewer than video_frames {frames}: trains at {frame_bucket(total, frames)}"

