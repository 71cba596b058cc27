//! The run's picture: training loss by step, and each checkpoint's compression ratio.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use crate::Error;
use crate::finetune::Summary;

/// The font the labels are drawn with (DejaVu Sans, ASCII subset: see `assets/README.md`).
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans-ascii.ttf");

/// Draws `summary` as a PNG at `path`.
pub fn draw(summary: &Summary, path: &Path) -> Result<(), Error> {
    let fail = |e: &dyn std::fmt::Display| Error::Plot {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    register_font("sans-serif", FontStyle::Normal, FONT).map_err(|_| Error::Plot {
        path: path.to_path_buf(),
        message: "the shipped font does not parse".into(),
    })?;
    let root = BitMapBackend::new(path, (1200, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let (left, right) = root.split_horizontally(700);
    loss_chart(summary, &left).map_err(|e| fail(&e))?;
    ratio_chart(summary, &right).map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;
type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn loss_chart(s: &Summary, area: &Area) -> DrawResult {
    let p = s.preset.pretrain_steps;
    let total = s.preset.total_steps() as f64;
    let finite = || {
        s.losses
            .iter()
            .map(|(_, l)| *l as f64)
            .filter(|l| l.is_finite())
    };
    let max = finite().fold(0.0, f64::max);
    let min = finite().fold(max, f64::min);
    let bottom = (min - 0.1 * (max - min)).max(0.0);
    let mut chart = ChartBuilder::on(area)
        .caption("Training loss (bytes, nats)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0f64..total, bottom..(max * 1.05).max(bottom + 1.0))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("cross-entropy")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .label_style(("sans-serif", 13))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    let points = |phase2: bool| -> Vec<(f64, f64)> {
        s.losses
            .iter()
            .filter(|(st, _)| (*st > p) == phase2)
            .map(|(st, l)| (*st as f64, *l as f64))
            .collect()
    };
    chart
        .draw_series(LineSeries::new(points(false), BLUE.stroke_width(2)))?
        .label("pretrain: tragedies")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLUE.stroke_width(2)));
    let orange = RGBColor(230, 120, 20);
    chart
        .draw_series(LineSeries::new(points(true), orange.stroke_width(2)))?
        .label("fine-tune: sonnets, lower half frozen")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], orange.stroke_width(2)));
    if let Some(c) = &s.crash {
        let top = (max * 1.05).max(1.0);
        let red = RED.stroke_width(2);
        let label = format!(
            "crash after {}, restored {}: {}/{} replayed losses bit-identical",
            c.crashed_after, c.restored_step, c.identical, c.replayed
        );
        chart
            .draw_series(DashedLineSeries::new(
                vec![
                    (c.crashed_after as f64, bottom),
                    (c.crashed_after as f64, top),
                ],
                6,
                4,
                red,
            ))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], red));
        let at = s
            .losses
            .iter()
            .find(|(st, _)| *st == c.restored_step)
            .map_or(bottom, |(_, l)| *l as f64);
        chart
            .draw_series(std::iter::once(Circle::new(
                (c.restored_step as f64, at),
                5,
                RED.filled(),
            )))?
            .label("restored snapshot")
            .legend(|(x, y)| Circle::new((x + 9, y), 5, RED.filled()));
    }
    let ckpt = BLACK.mix(0.5);
    chart
        .draw_series(s.store.snapshots.iter().map(|r| {
            TriangleMarker::new(
                (r.step as f64, bottom + 0.02 * (max - bottom)),
                4,
                ckpt.filled(),
            )
        }))?
        .label("checkpoint")
        .legend(move |(x, y)| TriangleMarker::new((x + 9, y), 4, ckpt.filled()));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()?;
    Ok(())
}

fn ratio_chart(s: &Summary, area: &Area) -> DrawResult {
    let total = s.preset.total_steps() as f64;
    let rows = &s.store.snapshots;
    let max = rows.iter().map(|r| r.ratio()).fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption(
            "Checkpoint compression (raw / file bytes)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(44)
        .build_cartesian_2d(0f64..total, 0f64..max * 1.15)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("ratio")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .label_style(("sans-serif", 13))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    let green = RGBColor(30, 140, 60);
    chart
        .draw_series(
            rows.iter()
                .filter(|r| !r.full)
                .map(|r| Circle::new((r.step as f64, r.ratio()), 4, green.filled())),
        )?
        .label("delta snapshot")
        .legend(move |(x, y)| Circle::new((x + 9, y), 4, green.filled()));
    chart
        .draw_series(rows.iter().filter(|r| r.full).map(|r| {
            Rectangle::new(
                [
                    (r.step as f64 - total / 150.0, 0.0),
                    (r.step as f64 + total / 150.0, r.ratio()),
                ],
                BLUE.mix(0.6).filled(),
            )
        }))?
        .label("full snapshot")
        .legend(|(x, y)| Rectangle::new([(x + 4, y - 5), (x + 14, y + 5)], BLUE.mix(0.6).filled()));
    chart.draw_series(std::iter::once(PathElement::new(
        vec![
            (s.preset.pretrain_steps as f64, 0.0),
            (s.preset.pretrain_steps as f64, max * 1.15),
        ],
        BLACK.mix(0.3),
    )))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()?;
    Ok(())
}
