// Subcommands of the `ztier` CLI. Each Register* adds its subcommand (and its
// options) to `parent` and sets a callback that stores its exit code in
// `*exit_code`. The CLI is the only part of ztier that prints.
#pragma once

#include <CLI/CLI.hpp>

namespace ztier::cli {

void RegisterBenchIo(CLI::App& bench, int* exit_code);
void RegisterBenchStep(CLI::App& bench, int* exit_code);
void RegisterBenchSweep(CLI::App& bench, int* exit_code);
void RegisterPlan(CLI::App& app, int* exit_code);
void RegisterConfigCommands(CLI::App& app, int* exit_code);
void RegisterTraceCommands(CLI::App& app, int* exit_code);
void RegisterReplay(CLI::App& app, int* exit_code);
void RegisterBenchSwap(CLI::App& bench, int* exit_code);
void RegisterBenchAdam(CLI::App& bench, int* exit_code);
void RegisterBenchOptimizer(CLI::App& bench, int* exit_code);
void RegisterBenchCheckpoint(CLI::App& bench, int* exit_code);
void RegisterCheckpointCommands(CLI::App& app, int* exit_code);

// Writes library log messages to stderr ("ztier: info: ...").
void InstallStderrLogSink(bool verbose);

}  // namespace ztier::cli
