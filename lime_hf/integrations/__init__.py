"""Optional integrations with other engines. The core package never imports them; each one needs its extra
(`pip install "lime_hf[datatrove]"` for `lime_hf.integrations.datatrove`)."""
