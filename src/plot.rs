//! The benchmark's picture: the latency distribution and the throughput
//! over time, side by side, as a PNG.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;

/// A TrueType font for the labels: the first of these that exists.
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

fn register_font() -> Result<()> {
    let path = FONTS
        .iter()
        .find(|p| Path::new(p).exists())
        .ok_or_else(|| anyhow!("--plot needs the DejaVu fonts (Debian: fonts-dejavu-core)"))?;
    let bytes: &'static [u8] = Box::leak(std::fs::read(path)?.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("cannot load the font {path}"))
}

/// Draws `samples` (publish time, event time) of one run to `file`.
pub fn draw(file: &Path, title: &str, samples: &[(Duration, Duration)]) -> Result<()> {
    register_font()?;
    let root = BitMapBackend::new(file, (1200, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(600);

    // Latency distribution: 30 bins from 0 to the largest latency.
    let lat: Vec<f64> = samples
        .iter()
        .map(|(p, e)| e.saturating_sub(*p).as_secs_f64() * 1000.0)
        .collect();
    let max = lat.iter().cloned().fold(1.0_f64, f64::max);
    let bins = 30usize;
    let width = max / bins as f64;
    let mut counts = vec![0u32; bins];
    for l in &lat {
        counts[((l / width) as usize).min(bins - 1)] += 1;
    }
    let top = counts.iter().copied().max().unwrap_or(1).max(1);
    let mut chart = ChartBuilder::on(&left)
        .caption(
            format!("{title}: publish-to-event latency"),
            ("sans-serif", 18),
        )
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(45)
        .build_cartesian_2d(0.0..max, 0u32..top + top / 10 + 1)?;
    chart
        .configure_mesh()
        .x_desc("ms")
        .y_desc("requests")
        .draw()?;
    chart.draw_series(counts.iter().enumerate().map(|(i, c)| {
        let x0 = i as f64 * width;
        Rectangle::new([(x0, 0), (x0 + width * 0.9, *c)], BLUE.filled())
    }))?;

    // Throughput: events per window, about 25 windows over the run.
    let end = samples
        .iter()
        .map(|(_, e)| e.as_secs_f64())
        .fold(0.0_f64, f64::max);
    let window = window_for(end);
    let windows = ((end / window).ceil() as usize).max(1);
    let mut per = vec![0u32; windows];
    for (_, e) in samples {
        per[((e.as_secs_f64() / window) as usize).min(windows - 1)] += 1;
    }
    // Each window's rate drawn at its middle.
    let rate: Vec<(f64, f64)> = per
        .iter()
        .enumerate()
        .map(|(i, n)| ((i as f64 + 0.5) * window, f64::from(*n) / window))
        .collect();
    let end = (windows as f64 * window).max(window);
    let peak = rate.iter().map(|(_, r)| *r).fold(1.0_f64, f64::max);
    let mut chart = ChartBuilder::on(&right)
        .caption(format!("{title}: throughput"), ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..end, 0.0..peak * 1.1)?;
    chart
        .configure_mesh()
        .x_desc(format!(
            "seconds (events counted per {} ms)",
            (window * 1000.0).round()
        ))
        .y_desc("events/s")
        .draw()?;
    chart.draw_series(LineSeries::new(rate, &RED))?;
    root.present()
        .with_context(|| format!("cannot write {}", file.display()))?;
    Ok(())
}

/// The width of the throughput plot's windows for a run of `end` seconds:
/// the first of 5, 10, 20, 50 ms, 0.1, 0.2, 0.5, 1, 2, 5 s… that cuts the
/// run into at most 25 windows.
fn window_for(end: f64) -> f64 {
    let mut step = 0.005;
    let mut k = 0;
    while end / step > 25.0 {
        step *= [2.0, 2.0, 2.5][k % 3];
        k += 1;
    }
    step
}

#[cfg(test)]
mod tests {
    use super::window_for;

    #[test]
    fn throughput_windows_follow_the_run_length() {
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(window_for(0.0), 0.005));
        assert!(close(window_for(0.12), 0.005));
        assert!(close(window_for(0.23), 0.01));
        assert!(close(window_for(0.6), 0.05));
        assert!(close(window_for(12.0), 0.5));
        assert!(close(window_for(47.0), 2.0));
        for end in [0.01, 0.3, 1.0, 7.5, 100.0, 3600.0] {
            assert!(end / window_for(end) <= 25.0, "{end} s");
        }
    }
}
