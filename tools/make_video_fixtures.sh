#!/usr/bin/env bash
# Derives the edge-case test clips (tests/fixtures/videos/) and the bad-input corpus
# (tests/fixtures/videos-bad/) from the bundled real clips with the ffmpeg CLI (Debian bookworm,
# FFmpeg 5.1). The outputs are committed; rerun only to regenerate them.
set -euo pipefail
cd "$(dirname "$0")/.."
V=tests/fixtures/videos
B=tests/fixtures/videos-bad
ff() { ffmpeg -nostdin -loglevel error -y "$@"; }
src=$V/bikes.mp4
# Rotated: display matrix of 90 degrees (phone portrait video).
ff -i $src -t 6 -vf scale=320:136 -c:v libx264 -crf 32 -preset veryfast -metadata:s:v rotate=90 $V/rotated90.mp4
# Variable frame rate: 6 of every 10 frames kept with their original timestamps.
ff -i $src -t 7 -vf "scale=320:136,select='lt(mod(n\,10)\,6)'" -vsync vfr -c:v libx264 -crf 32 -preset veryfast $V/vfr.mkv
# Video starts 1.3 s after the audio (edit list in mp4).
ff -f lavfi -i "sine=frequency=440:duration=7" -itsoffset 1.3 -i $src -map 1:v -map 0:a -t 7 \
  -vf scale=320:136 -c:v libx264 -crf 32 -preset veryfast -c:a aac -b:a 32k $V/audio_first.mp4
# 10-bit 4:2:0 H.264.
ff -i $src -t 6 -vf scale=320:136 -pix_fmt yuv420p10le -c:v libx264 -crf 32 -preset veryfast $V/tenbit.mp4
# Full-range MJPEG (yuvj420p), anamorphic (SAR 4:3).
ff -i $src -t 6 -vf "scale=240:136,setsar=4/3" -c:v mjpeg -q:v 8 $V/fullrange_mjpeg.avi
# Two video streams: the CLI (and we) take the larger one.
ff -i $src -t 6 -filter_complex "[0:v]scale=160:68[a];[0:v]scale=320:136[b]" -map "[a]" -map "[b]" \
  -c:v libx264 -crf 32 -preset veryfast $V/two_video_streams.mkv

# Bad inputs.
: > $B/empty.mp4
head -c 40000 $V/bikes.mp4 > $B/truncated.mp4
python3 - "$V/bikes.mp4" "$B/corrupt.mp4" <<'PY'
import sys
data = bytearray(open(sys.argv[1], 'rb').read())
# Overwrite the container header (ftyp/moov boxes) with garbage: nothing can be demuxed.
for i in range(0, 64):
    data[i] = (i * 37 + 11) % 256
open(sys.argv[2], 'wb').write(bytes(data[:60000]))
PY
ff -f lavfi -i "sine=frequency=440:duration=2" -c:a aac -b:a 32k $B/audio_only.m4a
# 8192x4608 (over the default 4096x2304 limit), a single black frame: tiny file, huge header.
ff -f lavfi -i "color=black:size=8192x4608:duration=0.04:rate=25" -c:v libx264 -qp 51 -preset ultrafast $B/huge_resolution.mp4
# A video track whose codec FFmpeg does not know (Matroska CodecID patched in place).
ff -i $src -t 1 -vf scale=64:32 -c:v libx264 -preset ultrafast $B/unknown_codec.mkv
python3 - "$B/unknown_codec.mkv" <<'PY'
import sys
p = sys.argv[1]
data = open(p, 'rb').read()
assert data.count(b'V_MPEG4/ISO/AVC') == 1
open(p, 'wb').write(data.replace(b'V_MPEG4/ISO/AVC', b'V_XYZW4/ISO/QQQ'))
PY
python3 -c "import random,sys; r=random.Random(3000); sys.stdout.buffer.write(bytes(r.randrange(256) for _ in range(3000)))" > $B/random.mp4
ls -l $V $B
