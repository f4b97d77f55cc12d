//! The tables the campaign and the benchmark print, and write into docs/: one description
//! (a header and rows of cells), rendered as aligned text for the terminal or as Markdown.

use comfy_table::{CellAlignment, Table, presets};

/// How a column's cells line up in the text table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    /// Words: to the left.
    Left,
    /// Figures: to the right.
    Right,
}

/// `rows` under `header`, aligned in columns two spaces apart, without borders.
pub fn text<const N: usize>(header: [&str; N], rows: &[[String; N]], align: [Align; N]) -> String {
    let mut table = Table::new();
    table.load_style(presets::NOTHING).set_header(header);
    for row in rows {
        table.add_row(row);
    }
    for (column, align) in table.column_iter_mut().zip(align) {
        column.set_cell_alignment(match align {
            Align::Left => CellAlignment::Left,
            Align::Right => CellAlignment::Right,
        });
        // No padding before the first column; two spaces between columns.
        column.set_padding((0, 2));
    }
    table
        .lines()
        .map(|line| line.trim_end().to_owned() + "\n")
        .collect()
}

/// `rows` under `header` as a Markdown table.
pub fn markdown<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    let mut table = Table::new();
    table.load_style(presets::ASCII_MARKDOWN).set_header(header);
    for row in rows {
        table.add_row(row);
    }
    table.lines().map(|line| line + "\n").collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_aligns_words_left_and_figures_right() {
        let rows = [
            ["a".to_owned(), "1".to_owned()],
            ["longer".to_owned(), "100".to_owned()],
        ];
        let text = text(["name", "n"], &rows, [Align::Left, Align::Right]);
        assert_eq!(text, "name      n\na         1\nlonger  100\n", "{text}");
    }

    #[test]
    fn markdown_has_a_header_row_and_a_separator() {
        let rows = [["a".to_owned(), "1".to_owned()]];
        let markdown = markdown(["name", "n"], &rows);
        let lines: Vec<&str> = markdown.lines().collect();
        assert_eq!(lines.len(), 3, "{markdown}");
        assert!(lines[0].starts_with("| name"), "{markdown}");
        assert!(lines[1].starts_with("|--"), "{markdown}");
        assert!(
            lines[2].contains("| a") && lines[2].contains("| 1"),
            "{markdown}"
        );
    }
}
