use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use acrf_worker::{LIVE, PEAK};
struct Counting;
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
}
#[global_allocator]
static A: Counting = Counting;

fn main() {
    std::thread::spawn(|| {
        loop {
            std::thread::sleep(std::time::Duration::from_millis(1));
            if std::path::Path::new("/tmp/reset_peak").exists() {
                let _ = std::fs::remove_file("/tmp/reset_peak");
                PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
                eprintln!("RESET live={}", LIVE.load(Ordering::Relaxed));
            }
            if std::path::Path::new("/tmp/report_peak").exists() {
                let _ = std::fs::remove_file("/tmp/report_peak");
                eprintln!(
                    "PEAK={} MiB LIVE={} MiB",
                    PEAK.load(Ordering::Relaxed) >> 20,
                    LIVE.load(Ordering::Relaxed) >> 20
                );
            }
        }
    });
    acrf_coordinator::cli::main()
}
