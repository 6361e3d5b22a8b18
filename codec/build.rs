//! rusty_ffmpeg links libavcodec only (FFMPEG_DLL_PATH in .cargo/config.toml); the video encoder
//! also calls libavformat, libavfilter, libavutil, libswscale and libswresample: link the system
//! shared libraries (FFmpeg 5.1 on Debian bookworm) through pkg-config.
fn main() {
    // Without the `ffmpeg` feature (the Python extension) no system library is linked.
    if std::env::var_os("CARGO_FEATURE_FFMPEG").is_none() {
        return;
    }
    for lib in [
        "libavformat",
        "libavfilter",
        "libavutil",
        "libswscale",
        "libswresample",
    ] {
        if let Err(e) = pkg_config::Config::new().cargo_metadata(true).probe(lib) {
            panic!(
                "{lib} not found through pkg-config ({e}); install the FFmpeg development \
                 packages: apt-get install libavcodec-dev libavformat-dev libavfilter-dev \
                 libavutil-dev libswscale-dev libswresample-dev pkg-config clang libclang-dev"
            );
        }
    }
}
