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

    // Throughput: events per 100 ms window.
    let end = samples
        .iter()
        .map(|(_, e)| e.as_secs_f64())
        .fold(0.1_f64, f64::max);
    let windows = ((end / 0.1).ceil() as usize).max(1);
    let mut per = vec![0u32; windows];
    for (_, e) in samples {
        per[((e.as_secs_f64() / 0.1) as usize).min(windows - 1)] += 1;
    }
    let rate: Vec<(f64, f64)> = per
        .iter()
        .enumerate()
        .map(|(i, n)| (i as f64 * 0.1, f64::from(*n) * 10.0))
        .collect();
    let peak = rate.iter().map(|(_, r)| *r).fold(1.0_f64, f64::max);
    let mut chart = ChartBuilder::on(&right)
        .caption(format!("{title}: throughput"), ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..end, 0.0..peak * 1.1)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("events/s")
        .draw()?;
    chart.draw_series(LineSeries::new(rate, &RED))?;
    root.present()
        .with_context(|| format!("cannot write {}", file.display()))?;
    Ok(())
}
