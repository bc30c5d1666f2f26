use poolformer_edge::{Engine, Options};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
struct Count;
static CUR: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
unsafe impl GlobalAlloc for Count {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        let c = CUR.fetch_add(l.size(), Relaxed) + l.size();
        PEAK.fetch_max(c, Relaxed);
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        CUR.fetch_sub(l.size(), Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        let q = System.realloc(p, l, n);
        if n > l.size() {
            let c = CUR.fetch_add(n - l.size(), Relaxed) + n - l.size();
            PEAK.fetch_max(c, Relaxed);
        } else {
            CUR.fetch_sub(l.size() - n, Relaxed);
        }
        q
    }
}
#[global_allocator]
static A: Count = Count;
fn hwm() -> String {
    format!(
        "heap {:.1} MB peak {:.1} MB | {}",
        CUR.load(Relaxed) as f64 / 1e6,
        PEAK.load(Relaxed) as f64 / 1e6,
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("VmHWM") || l.starts_with("VmRSS"))
            .collect::<Vec<_>>()
            .join(" ")
    )
}
fn main() -> anyhow::Result<()> {
    let path = std::env::args().nth(1).unwrap();
    if std::env::var("MM").is_ok() {
        let t: i32 = std::env::var("MM").unwrap().parse().unwrap();
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, t);
            libc::mallopt(libc::M_TRIM_THRESHOLD, t);
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
    println!("start {}", hwm());
    let e = Engine::from_path(&path, Options::default())?;
    if std::env::var("TRIM").is_ok() {
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::malloc_trim(0);
        }
    }
    println!("loaded {}", hwm());
    PEAK.store(CUR.load(Relaxed), Relaxed);
    let x = tract_onnx::prelude::tract_ndarray::Array4::<f32>::zeros((1, 3, 224, 224));
    e.run_array(x.clone())?;
    println!("ran {}", hwm());
    let t = std::time::Instant::now();
    for _ in 0..20 {
        e.run_array(x.clone())?;
    }
    println!("ran 20 {} {:?}", hwm(), t.elapsed() / 20);
    Ok(())
}
