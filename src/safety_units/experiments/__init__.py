"""The studies and reports built on the layers below: the SSAH study, the defense benchmark, dose-response, the
attribution validity harness, SCANS' report and Jain et al.'s testbed."""
