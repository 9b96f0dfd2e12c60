"""Privacy accounting: events, dp_accounting PLD/RDP, calibration, the Rényi filter."""
