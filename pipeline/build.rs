//! nasm is a hard requirement: without it mozjpeg-sys silently builds without SIMD, which makes
//! JPEG encode ~5x and decode ~2x slower while producing the same bytes (REFERENCE.md section 3).
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=NASM");
    let nasm = std::env::var("NASM").unwrap_or_else(|_| "nasm".into());
    match std::process::Command::new(&nasm).arg("-v").output() {
        Ok(out) if out.status.success() => {}
        _ => panic!(
            "\n\nnasm is required to build codeclm (mozjpeg's SIMD code is assembled with it; without it JPEG \
             coding is several times slower).\nInstall it: `sudo apt-get install nasm` (Debian/Ubuntu), \
             `brew install nasm` (macOS), or run `make setup`.\n\n"
        ),
    }
}
