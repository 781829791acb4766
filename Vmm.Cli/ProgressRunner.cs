// ProgressRunner: steps of work with a progress bar each. On a terminal, Spectre's progress display
// (a bar per step, the percentage, the time so far); when the output is a pipe or a CI log, where a
// bar cannot redraw, a plain line at every tenth of each step instead. A step may find it has more to
// do than it announced (one more full scan) and grow its total.
using System.Diagnostics;
using Spectre.Console;

namespace Vmm.Cli;

/// <summary>What a step reports its progress to.</summary>
internal interface IProgressSink
{
    /// <summary>Another <paramref name="amount"/> units done.</summary>
    void Advance(long amount);

    /// <summary>The step turned out <paramref name="amount"/> units longer.</summary>
    void Grow(long amount);
}

/// <summary>Runs steps one after the other, each with its own bar.</summary>
internal sealed class ProgressRunner
{
    private readonly IAnsiConsole _console;

    public ProgressRunner(IAnsiConsole console) => _console = console;

    /// <summary>Runs each step, in order: its name, its announced total, and the work.</summary>
    public void Run(params (string Name, long Total, Action<IProgressSink> Work)[] steps)
    {
        if (KsmView.IsLive(_console))
        {
            _console.Progress()
                .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new ElapsedTimeColumn())
                .Start(context =>
                {
                    foreach ((string name, long total, Action<IProgressSink> work) in steps)
                    {
                        ProgressTask task = context.AddTask(name, maxValue: Math.Max(1, total));
                        work(new BarSink(task));
                        task.Value = task.MaxValue;
                        task.StopTask();
                    }
                });
            return;
        }
        foreach ((string name, long total, Action<IProgressSink> work) in steps)
        {
            var sink = new LineSink(_console, name, total);
            work(sink);
            sink.Finish();
        }
    }

    private sealed class BarSink(ProgressTask task) : IProgressSink
    {
        public void Advance(long amount) => task.Increment(amount);

        public void Grow(long amount) => task.MaxValue += amount;
    }

    /// <summary>A line whenever the step crosses another tenth of its total.</summary>
    private sealed class LineSink(IAnsiConsole console, string name, long total) : IProgressSink
    {
        private readonly Stopwatch _clock = Stopwatch.StartNew();
        private long _total = Math.Max(1, total);
        private long _done;
        private int _tenthsPrinted = -1;

        public void Advance(long amount)
        {
            _done += amount;
            int tenths = (int)Math.Min(10, _done * 10 / _total);
            if (tenths > _tenthsPrinted && tenths < 10)
                Print(tenths);
        }

        public void Grow(long amount) => _total += amount;

        public void Finish() => Print(10);

        private void Print(int tenths)
        {
            _tenthsPrinted = tenths;
            console.WriteLine($"  {name,-10} {tenths * 10,3}%  {_clock.Elapsed.TotalSeconds,5:F1} s");
        }
    }
}
