/* The test guest's I/O probe (tests/guest/build.py puts it in the initramfs as /bin/probe).

   probe DISK SYNC SLOW_US EVERY_MS PAUSE_US

   One process, SCHED_FIFO so that the shell's counter never delays it, rewrites one 4 KiB
   block 1 MiB before the end of /dev/DISK (O_DIRECT, plus O_DSYNC when SYNC is 1: each
   write is then a virtio write and a flush), timing each write with CLOCK_MONOTONIC, and
   sleeps PAUSE_US after each (under TCG a flat-out loop takes the whole vCPU and starves
   the counter; a stall during the sleep shows as oversleep). A slow serial console cannot
   carry a line per write, so it prints:

     P start <now> <disk> <offset> <sync> <slow_us> <every_ms> <pause_us>
     P slow <now> <start> <latency> <idle>      a write whose latency or idle reached SLOW_US
     P sum <now> <writes> <median> <max> <maxidle> <dropped>   every EVERY_MS

   All times in microseconds of the guest's CLOCK_MONOTONIC; <now> is read just before the
   line is written (the host pairs it with the line's arrival). <idle> is how much later than
   PAUSE_US after the previous write's end (or the end of the line printed after it) this
   write started: a stall of the vCPU outside the I/O. At most 20 slow lines per period as they happen; of the
   others, the longest is printed just before the period's summary and the rest are counted
   in <dropped>: the worst write of every period is always printed with its time. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096
#define SLOW_LINES_PER_PERIOD 20
#define MAX_SAMPLES 65536

static uint64_t now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static void say(const char *line) {
    size_t len = strlen(line), done = 0;
    while (done < len) {
        ssize_t n = write(1, line + done, len - done);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return;
        done += (size_t)n;
    }
}

static int by_value(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

static uint32_t samples[MAX_SAMPLES];

static void sleep_until(uint64_t us) {
    struct timespec ts = {.tv_sec = (time_t)(us / 1000000u), .tv_nsec = (long)(us % 1000000u) * 1000};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
}

static void print_slow(char *line, size_t size, uint64_t start, uint64_t lat, uint64_t idle) {
    snprintf(line, size, "P slow %llu %llu %llu %llu\n", (unsigned long long)now_us(), (unsigned long long)start,
             (unsigned long long)lat, (unsigned long long)idle);
    say(line);
}

int main(int argc, char **argv) {
    if (argc != 6) {
        say("P error usage: probe DISK SYNC SLOW_US EVERY_MS PAUSE_US\n");
        return 2;
    }
    char path[64], line[160];
    snprintf(path, sizeof path, "/dev/%s", argv[1]);
    int sync = atoi(argv[2]);
    uint64_t slow = strtoull(argv[3], NULL, 10), every = strtoull(argv[4], NULL, 10) * 1000u;
    uint64_t pause = strtoull(argv[5], NULL, 10);
    struct sched_param prio = {.sched_priority = 50};
    if (sched_setscheduler(0, SCHED_FIFO, &prio) != 0) say("P warning: no SCHED_FIFO\n");
    int fd = open(path, O_WRONLY | O_DIRECT | (sync ? O_DSYNC : 0));
    uint64_t size = 0;
    if (fd < 0 || ioctl(fd, BLKGETSIZE64, &size) != 0 || size < 2 * 1024 * 1024) {
        snprintf(line, sizeof line, "P error %s: %s\n", path, strerror(errno));
        say(line);
        return 1;
    }
    off_t offset = (off_t)(size - 1024 * 1024);
    char *buf;
    if (posix_memalign((void **)&buf, BLOCK, BLOCK) != 0) return 1;
    memset(buf, 0, BLOCK);
    uint64_t t = now_us();
    snprintf(line, sizeof line, "P start %llu %s %llu %d %llu %llu %llu\n", (unsigned long long)t, argv[1],
             (unsigned long long)offset, sync, (unsigned long long)slow, (unsigned long long)every / 1000u,
             (unsigned long long)pause);
    say(line);
    uint64_t seq = 0, period_start = now_us(), prev_end = period_start, max_lat = 0, max_idle = 0;
    uint64_t held_start = 0, held_lat = 0, held_idle = 0;  // the longest slow write not printed yet
    unsigned count = 0, slow_lines = 0, dropped = 0;
    for (;;) {
        snprintf(buf, BLOCK, "SNAPFSPRB %llu\n", (unsigned long long)seq++);
        if (pause) sleep_until(prev_end + pause);
        uint64_t start = now_us();
        if (pwrite(fd, buf, BLOCK, offset) != BLOCK) {
            snprintf(line, sizeof line, "P error write: %s\n", strerror(errno));
            say(line);
            return 1;
        }
        uint64_t end = now_us(), lat = end - start, idle = start > prev_end + pause ? start - prev_end - pause : 0;
        prev_end = end;
        if (count < MAX_SAMPLES) samples[count] = (uint32_t)(lat > UINT32_MAX ? UINT32_MAX : lat);
        count++;
        if (lat > max_lat) max_lat = lat;
        if (idle > max_idle) max_idle = idle;
        if (lat >= slow || idle >= slow) {
            if (slow_lines < SLOW_LINES_PER_PERIOD) {
                slow_lines++;
                print_slow(line, sizeof line, start, lat, idle);
                prev_end = now_us();
            } else {
                if (held_lat + held_idle) dropped++;
                if (lat + idle > held_lat + held_idle) held_start = start, held_lat = lat, held_idle = idle;
            }
        }
        if (end - period_start >= every) {
            if (held_lat + held_idle) print_slow(line, sizeof line, held_start, held_lat, held_idle);
            held_lat = held_idle = 0;
            unsigned n = count < MAX_SAMPLES ? count : MAX_SAMPLES;
            qsort(samples, n, sizeof samples[0], by_value);
            snprintf(line, sizeof line, "P sum %llu %u %u %llu %llu %u\n", (unsigned long long)now_us(), count,
                     samples[n / 2], (unsigned long long)max_lat, (unsigned long long)max_idle, dropped);
            say(line);
            period_start = prev_end = now_us();
            count = slow_lines = dropped = 0;
            max_lat = max_idle = 0;
        }
    }
}
