"""Report rendering: report.json and report.md, the dataset card, markdown tables, figures, UI artifacts."""
