//! The program's care of glibc's allocator: settle it before any traffic, and
//! give back what a burst freed. The library leaves a host's allocator alone;
//! this is process policy, and the one place in the crate with `unsafe`.

use std::time::Duration;

/// Size of the block that [`settle`] frees: above any buffer a tunnel
/// allocates per frame or per write (frames are at most 64 KiB, the read gate
/// holds 256 KiB by default).
const SETTLING_BLOCK: usize = 512 * 1024;

/// How often [`release_after_activity`] looks at the process's CPU time.
const RELEASE_PERIOD: Duration = Duration::from_secs(1);

/// glibc's malloc starts out serving blocks of 128 KiB and more with `mmap`
/// and giving the top of its heap back to the kernel whenever 128 KiB are free
/// there. A tunnel's buffers (64 KiB to a few hundred KiB, allocated and freed
/// at memory speed, many inside actix) then cycle their pages out and back in:
/// measured, about one page fault per 4 KiB moved, a 4 GiB upload costing the
/// server a million faults and twice the CPU. Freeing one `mmap`ed block raises
/// both thresholds, to its size and twice that (mallopt(3), "dynamic mmap
/// threshold"); done once, before any traffic. Other allocators just allocate
/// and free the block.
pub(crate) fn settle() {
    let block: Vec<u8> = Vec::with_capacity(SETTLING_BLOCK);
    drop(std::hint::black_box(block));
}

/// Seconds without CPU use after activity in which [`release_after_activity`]
/// trims once more: the last frees of a burst (a drain, a close) may cost less
/// than the clock tick that `/proc` counts CPU time in, and must not be kept.
const QUIET_TRIMS: u8 = 2;

/// Gives freed memory back to the kernel after each second in which the
/// process worked, and in the first quiet seconds after. glibc returns only
/// the free top of each heap; what a burst of transfers freed below live
/// allocations stays resident (measured: an agent at 12.6 MiB after the
/// benchmark's loads, 7.7 MiB once trimmed). An idle second costs one read of
/// `/proc/self/stat`; a busy one also a walk of the allocator's free lists,
/// well under a millisecond for a tunnel's heap, and the page faults of reusing
/// what was returned (a few hundred per second).
pub(crate) async fn release_after_activity() {
    let mut last = cpu_ticks();
    let mut quiet_trims = QUIET_TRIMS;
    let mut tick = tokio::time::interval(RELEASE_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = cpu_ticks();
        if now != last {
            quiet_trims = QUIET_TRIMS;
            release_freed_memory();
        } else if quiet_trims > 0 {
            quiet_trims -= 1;
            release_freed_memory();
        }
        last = now;
    }
}

/// The process's user and system CPU time, in clock ticks (`/proc/self/stat`
/// fields 14 and 15); `None` where there is no such file.
fn cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // the command name (field 2) may hold spaces: count from its closing paren
    let fields = stat.get(stat.rfind(')')? + 2..)?;
    let mut times = fields.split(' ').skip(11).take(2);
    let user: u64 = times.next()?.parse().ok()?;
    let system: u64 = times.next()?.parse().ok()?;
    Some(user + system)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn release_freed_memory() {
    // SAFETY: malloc_trim(3) takes no pointer and has no precondition; glibc
    // serialises it with every other allocator call, on every thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_freed_memory() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_process_cpu_time_where_proc_exists() {
        if std::path::Path::new("/proc/self/stat").exists() {
            let before = cpu_ticks().unwrap_or(0);
            let spin = std::time::Instant::now();
            while spin.elapsed() < Duration::from_millis(50) {
                std::hint::black_box(spin.elapsed());
            }
            assert!(cpu_ticks().unwrap_or(0) > before);
        }
    }
}
