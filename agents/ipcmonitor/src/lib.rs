//! ipcmonitor
