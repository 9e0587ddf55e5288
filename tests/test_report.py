from sift_fl.report import build_report, format_table, report_problems


def test_report_problems_counts_earlier_withdrawals():
    report = {"merged_clients": ["0", "2"], "withdrawn_clients": ["1"], "withdrawals": [], "failures": []}

    assert report_problems(report, expected_clients=3) == []


def test_report_problems_flags_missing_clients():
    report = {"merged_clients": ["0"], "withdrawals": [], "failures": []}

    assert report_problems(report, expected_clients=3) == ["only 1 of 3 clients were merged"]


def test_report_problems_flags_inexact_withdrawal():
    withdrawal = {"client": "1", "status": "withdrawn", "bit_exact": False, "seconds": 0.1}
    report = {"merged_clients": ["0"], "withdrawals": [withdrawal], "failures": []}

    assert report_problems(report, expected_clients=2) == ["withdrawal of client 1 was not bit-exact"]


def test_build_report_means_and_table():
    evaluations = {
        "merged": {
            "0": {"accuracy-local": 1.0, "accuracy-sift-masks": 0.5, "served": "masked"},
            "1": {"accuracy-local": 0.5, "accuracy-sift-masks": 1.0, "served": "masked"},
        }
    }

    report = build_report("digits", 2, {"0": {"density": 0.5}, "1": {"density": 0.6}}, evaluations, [], [])
    table = format_table(report)

    assert report["methods"]["local"]["mean_accuracy"] == 0.75
    assert report["methods"]["sift_masks"]["mean_accuracy"] == 0.75
    assert [c["client"] for c in report["clients"]] == ["0", "1"]
    assert "mean" in table


def test_build_report_client_withdrawal_before_evaluation():
    # A withdrawal requested when the run starts has no later phase: the "merged" evaluation follows it.
    evaluations = {"merged": {"1": {"accuracy-sift-masks": 0.25, "served": "unmasked"}}}
    withdrawal = {"client": "1", "status": "withdrawn", "bit_exact": True, "seconds": 0.01}

    report = build_report("digits", 2, {}, evaluations, [withdrawal], [])

    assert report["withdrawals"][0]["served_after"] == "unmasked"
    assert report["withdrawals"][0]["accuracy_after"] == {"sift_masks": 0.25}


def test_build_report_means_leave_out_withdrawn_clients():
    evaluations = {
        "merged": {
            "0": {"accuracy-sift-masks": 1.0, "served": "masked"},
            "1": {"accuracy-sift-masks": 0.0, "served": "unmasked"},
        }
    }

    report = build_report("digits", 2, {}, evaluations, [], [])
    table = format_table(report)

    assert report["methods"]["sift_masks"] == {"mean_accuracy": 1.0, "clients": 1}
    assert "      1* " in table
    assert "left out of the means" in table
